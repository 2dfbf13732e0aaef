# dq: make install PREFIX=/deep/group/dq [GROUP=lab] [DESTDIR=...]; make test
PREFIX ?= /usr/local/dq
GROUP ?=
PYTHON ?= python3
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' dq.py)

.PHONY: install uninstall test bench bench-smoke version

# Where bash-completion looks for completions: the system's as root, else yours.
COMPLETIONSDIR ?= $(shell if [ "$$(id -u)" = 0 ]; then echo /usr/share/bash-completion/completions; \
	else echo "$${XDG_DATA_HOME:-$$HOME/.local/share}/bash-completion/completions"; fi)

install:
	./install.sh "$(DESTDIR)$(PREFIX)" $(GROUP)
	mkdir -p "$(DESTDIR)$(COMPLETIONSDIR)"
	for l in links/dq-*; do \
	    ln -sfn "$(PREFIX)/share/bash-completion/completions/dq.bash" \
	        "$(DESTDIR)$(COMPLETIONSDIR)/$${l#links/}"; done

# Removes the program and its commands; the jobs and dq.conf stay.
uninstall:
	rm -f "$(DESTDIR)$(PREFIX)/dq.py"
	for l in links/dq-*; do rm -f "$(DESTDIR)$(PREFIX)/bin/$${l#links/}" \
	    "$(DESTDIR)$(COMPLETIONSDIR)/$${l#links/}"; done
	-rmdir "$(DESTDIR)$(PREFIX)/bin"

test:
	$(PYTHON) -m pytest -q tests

# The benchmark suite (issue targets vs measured); --smoke for a quick run.
bench:
	$(PYTHON) bench/run

bench-smoke:
	$(PYTHON) bench/run --smoke

version:
	@echo $(VERSION)
