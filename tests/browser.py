"""A real headless browser for dq-web's tests: Debian's chromium, driven
over its --remote-debugging-pipe (the DevTools protocol: JSON messages
ended by a NUL byte, read from fd 3 and written to fd 4), with the
standard library only; and a PNG reader (zlib) to look at the pixels of
its screenshots."""
import base64
import fcntl
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import time
import zlib

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """One headless chromium with one tab."""

    def __init__(self):
        self.home = tempfile.mkdtemp(prefix="dq-chromium-")
        to_read, self._to = os.pipe()           # chromium reads its fd 3
        self._from, from_write = os.pipe()      # and writes its fd 4

        def fds_3_and_4():
            a = fcntl.fcntl(to_read, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_write, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--hide-scrollbars", f"--user-data-dir={self.home}",
             "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=fds_3_and_4, close_fds=False, env=dict(os.environ, HOME=self.home))
        os.close(to_read)
        os.close(from_write)
        self._buf, self._id, self._session = b"", 0, None
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self.send("Target.attachToTarget",
                                  {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method, params=None, timeout=60):
        """A DevTools command (to the tab once there is one); its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self._session:
            msg["sessionId"] = self._session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._from], [], [], left)[0]:
                    raise AssertionError(f"chromium did not answer {method} in {timeout}s")
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise AssertionError(f"chromium exited: {self.proc.stderr.read()[-2000:]!r}")
                self._buf += chunk
            raw, _, self._buf = self._buf.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:     # (events are skipped)
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url, width, height):
        """Load url in a window of width x height CSS pixels (a phone's,
        with its viewport rules, below 600)."""
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
        self.eval("window.dqtestOld = true")      # (gone once the new page is there)
        self.send("Page.navigate", {"url": url})

    def eval(self, expression):
        """The value of a JavaScript expression in the page (JSON-able)."""
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                            "awaitPromise": True})
        if "exceptionDetails" in r:
            raise AssertionError(f"script in the page failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, clip=None):
        """PNG bytes of the window, or of clip ({x, y, width, height} in
        page pixels, wherever it is on the page)."""
        params = {"format": "png"}
        if clip:
            params.update(clip=dict(clip, scale=1), captureBeyondViewport=True)
        return base64.b64decode(self.send("Page.captureScreenshot", params)["data"])

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stderr.close()
        os.close(self._to)
        os.close(self._from)
        shutil.rmtree(self.home, ignore_errors=True)


def png_pixels(data):
    """(width, height, [[(r, g, b), ...] per row]) of an 8-bit RGB or RGBA,
    non-interlaced PNG (what chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:8]
    pos, idat, head = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = head
    assert depth == 8 and color in (2, 6) and not interlace, head
    bpp = 3 if color == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        at = y * (stride + 1)
        kind, line = raw[at], bytearray(raw[at + 1:at + 1 + stride])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif kind == 2:
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 255
        elif kind == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return width, height, rows
