"""A stand-in adbd: the device end of the adb protocol over TCP, serving an arm64 Debian root.

The real adb client (Debian's ``adb``) connects to it with ``adb connect 127.0.0.1:PORT`` and
drives it as it drives a phone: the CNXN/AUTH handshake, streams (OPEN, OKAY, WRTE, CLSE), the
shell protocol v2 (stdout, stderr and the exit code apart) and the sync protocol (STAT, LIST,
SEND, RECV) behind push and pull. The daemon chroots into the root after setting it up, so every
path it serves and every command it runs (``/system/bin/sh -c COMMAND``) is the root's: arm64
code, run by qemu-user through binfmt_misc.

Run it as root inside private mount and pid namespaces (``unshare --mount --pid --fork
--kill-child``, as the test fixtures do): it mounts /proc, /sys, /dev and an ARM-format
/proc/cpuinfo into the root (the runtimes read it at import), and with ``--data-kib`` a small
tmpfs on /data/local/tmp. All of it, and every process it started, goes when it exits; it exits
by itself after ``--lifetime`` seconds. It listens on 127.0.0.1 only.

Like adbd serving a raw (non-pty) shell, it does not kill a command whose client went away: the
command runs on until it ends or something on the device kills it (device_eval's remote pkill).

Modes: ``device``; ``unauthorized`` (answers the handshake with AUTH tokens and never accepts a
key, as a phone whose 'Allow USB debugging' prompt nobody accepts); ``offline`` (accepts the TCP
connection and never answers).
"""

import argparse
import asyncio
import os
import secrets
import stat
import struct
import subprocess
import sys
from pathlib import Path


def _word(text: bytes) -> int:
    return int.from_bytes(text, "little")


CNXN, AUTH, OPEN, OKAY, CLSE, WRTE = map(_word, (b"CNXN", b"AUTH", b"OPEN", b"OKAY", b"CLSE",
                                                  b"WRTE"))
AUTH_TOKEN, AUTH_SIGNATURE = 1, 2
VERSION = 0x01000001
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024
FEATURES = "shell_v2,fixed_push_mkdir"
BANNER = ("device::ro.product.name=safeexport_rig;ro.product.model=arm64_qemu_user;"
          f"ro.product.device=rig;features={FEATURES}")
# shell protocol v2 packet ids
STDIN, STDOUT, STDERR, EXIT, CLOSE_STDIN = 0, 1, 2, 3, 4
ENV = {"PATH": "/system/bin:/usr/local/bin:/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8",
       "TMPDIR": "/data/local/tmp"}
# A phone core (the root's cpuinfo describes one): qemu's default "max" CPU advertises i8mm,
# SVE2 and SME, and under it LiteRT's XNNPack int8 kernels gave wrong logits here (argmax
# agreement 28% with x86); as a Cortex-A76 (dotprod, fp16) they match x86 exactly.
DEFAULT_CPU = "cortex-a76"


class Closed(Exception):
    """The stream was closed by the other end."""


class Stream:
    """One adb stream: bytes from the host are buffered; writes wait for the host's OKAY."""

    def __init__(self, conn: "Connection", local: int, remote: int) -> None:
        self.conn, self.local, self.remote = conn, local, remote
        self.buf = bytearray()
        self.arrived = asyncio.Event()
        self.ready = asyncio.Event()
        self.ready.set()
        self.closed = False

    def feed(self, data: bytes) -> None:
        self.buf += data
        self.arrived.set()

    def remote_closed(self) -> None:
        self.closed = True
        self.arrived.set()
        self.ready.set()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.closed:
                raise Closed
            self.arrived.clear()
            await self.arrived.wait()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), self.conn.max_payload):
            await self.ready.wait()
            if self.closed:
                raise Closed
            self.ready.clear()
            self.conn.send(WRTE, self.local, self.remote, data[i:i + self.conn.max_payload])

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.send(CLSE, self.local, self.remote)
        self.conn.streams.pop(self.local, None)


class Connection:
    """One host connection (one ``adb connect``) and its streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 mode: str) -> None:
        self.reader, self.writer, self.mode = reader, writer, mode
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD
        self.tasks: set[asyncio.Task] = set()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        head = struct.pack("<6I", command, arg0, arg1, len(data), sum(data) & 0xFFFFFFFF,
                           command ^ 0xFFFFFFFF)
        self.writer.write(head + data)

    async def serve(self) -> None:
        try:
            while True:
                head = await self.reader.readexactly(24)
                command, arg0, arg1, length, _, magic = struct.unpack("<6I", head)
                if magic != command ^ 0xFFFFFFFF or length > 16 * MAX_PAYLOAD:
                    return  # not adb: drop the connection, as adbd does
                data = await self.reader.readexactly(length) if length else b""
                self.dispatch(command, arg0, arg1, data)
                await self.writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for s in list(self.streams.values()):
                s.remote_closed()
            self.writer.close()

    def dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if self.mode == "offline":
            return
        if command == CNXN:
            if self.mode == "unauthorized":
                self.send(AUTH, AUTH_TOKEN, 0, secrets.token_bytes(20))
                return
            self.max_payload = min(arg1, MAX_PAYLOAD)
            self.send(CNXN, VERSION, MAX_PAYLOAD, BANNER.encode())
        elif command == AUTH:
            if arg0 == AUTH_SIGNATURE:  # no key is ever accepted; a public key waits forever
                self.send(AUTH, AUTH_TOKEN, 0, secrets.token_bytes(20))
        elif command == OPEN:
            self.open(arg0, data.rstrip(b"\0").decode("utf-8", "replace"))
        elif command == OKAY:
            if (s := self.streams.get(arg1)) is not None:
                s.ready.set()
        elif command == WRTE:
            if (s := self.streams.get(arg1)) is not None:
                s.feed(data)
                self.send(OKAY, arg1, arg0)
        elif command == CLSE:
            if (s := self.streams.pop(arg1, None)) is not None:
                s.remote_closed()

    def open(self, remote: int, service: str) -> None:
        kind, _, rest = service.partition(":")
        options = kind.split(",")
        if options[0] == "shell" and rest:
            handler = shell(rest, "v2" in options[1:])
        elif service == "sync:":
            handler = sync()
        else:  # interactive shells and other services are not served
            self.send(CLSE, 0, remote)
            return
        stream = Stream(self, self.next_id, remote)
        self.streams[stream.local] = stream
        self.next_id += 1
        self.send(OKAY, stream.local, remote)
        task = asyncio.create_task(run_service(handler, stream))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def run_service(handler, stream: Stream) -> None:
    try:
        await handler(stream)
    except Closed:
        pass
    finally:
        stream.close()


def shell(command: str, v2: bool):
    """``shell[,v2,...]:COMMAND``: run it with the root's /system/bin/sh."""

    async def serve(stream: Stream) -> None:
        proc = await asyncio.create_subprocess_exec(
            "/system/bin/sh", "-c", command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if v2 else subprocess.STDOUT, env=ENV, cwd="/")

        async def pump(pipe: asyncio.StreamReader, packet_id: int) -> None:
            while chunk := await pipe.read(SYNC_DATA_MAX):
                try:
                    await stream.write(packet(packet_id, chunk) if v2 else chunk)
                except Closed:
                    pass  # the client left: keep draining so the command is never blocked

        feeder = asyncio.create_task(feed_stdin(stream, proc.stdin, v2))
        await asyncio.gather(pump(proc.stdout, STDOUT),
                             *([pump(proc.stderr, STDERR)] if v2 else []))
        code = await proc.wait()
        feeder.cancel()
        if v2:
            await stream.write(packet(EXIT, bytes([code if code >= 0 else 128 - code])))

    return serve


def packet(packet_id: int, data: bytes) -> bytes:
    return struct.pack("<BI", packet_id, len(data)) + data


async def feed_stdin(stream: Stream, stdin: asyncio.StreamWriter, v2: bool) -> None:
    try:
        while True:
            if not v2:
                data = await stream.read_exactly(1)
                stdin.write(data + await stream.read_exactly(len(stream.buf)))
                continue
            packet_id, length = struct.unpack("<BI", await stream.read_exactly(5))
            data = await stream.read_exactly(length)
            if packet_id == STDIN:
                stdin.write(data)
                await stdin.drain()
            elif packet_id == CLOSE_STDIN:
                break
    except (Closed, ConnectionError):
        pass
    finally:
        stdin.close()


def sync():
    """``sync:``: the file transfer protocol behind push and pull."""

    async def serve(stream: Stream) -> None:
        while True:
            request = await stream.read_exactly(8)
            kind, length = request[:4], struct.unpack("<I", request[4:])[0]
            if kind == b"QUIT":
                return
            if length > 4096:
                return await fail(stream, "path too long")
            path = (await stream.read_exactly(length)).decode("utf-8", "replace")
            if kind == b"STAT":
                st = _lstat(path)
                await stream.write(b"STAT" + struct.pack(
                    "<III", *((st.st_mode, st.st_size & 0xFFFFFFFF, int(st.st_mtime))
                              if st else (0, 0, 0))))
            elif kind == b"LIST":
                await list_dir(stream, path)
            elif kind == b"RECV":
                await send_file(stream, path)
            elif kind == b"SEND":
                await receive_file(stream, path)
            else:
                return await fail(stream, f"unknown sync request {kind!r}")

    return serve


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


async def fail(stream: Stream, message: str) -> None:
    data = message.encode()
    await stream.write(b"FAIL" + struct.pack("<I", len(data)) + data)


async def list_dir(stream: Stream, path: str) -> None:
    try:
        names = [".", "..", *sorted(os.listdir(path))]
    except OSError:
        names = []
    for name in names:
        st = _lstat(os.path.join(path, name))
        if st is not None:
            raw = name.encode()
            await stream.write(b"DENT" + struct.pack("<IIII", st.st_mode, st.st_size & 0xFFFFFFFF,
                                                     int(st.st_mtime), len(raw)) + raw)
    await stream.write(b"DONE" + bytes(16))


async def send_file(stream: Stream, path: str) -> None:
    try:
        with open(path, "rb") as f:
            while chunk := f.read(SYNC_DATA_MAX):
                await stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
    except OSError as e:
        return await fail(stream, f"open failed: {e.strerror}")
    await stream.write(b"DONE" + bytes(4))


async def receive_file(stream: Stream, spec: str) -> None:
    path, _, mode = spec.rpartition(",")
    error, f = None, None
    try:
        os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
        f = open(path, "wb")  # noqa: SIM115 - kept open across the DATA messages
    except OSError as e:
        error = e
    try:
        while True:
            kind, length = struct.unpack("<4sI", await stream.read_exactly(8))
            if kind == b"DONE":
                mtime = length
                break
            if kind != b"DATA" or length > SYNC_DATA_MAX:
                return await fail(stream, f"bad sync data message {kind!r}")
            data = await stream.read_exactly(length)
            if error is None:
                try:
                    f.write(data)
                except OSError as e:
                    error = e
        if f is not None and error is None:
            try:
                f.close()
            except OSError as e:
                error = e
    finally:
        if f is not None and not f.closed:
            f.close()
    if error is not None:
        if f is not None:
            os.unlink(path)
        return await fail(stream, f"{path}: {error.strerror}")
    os.chmod(path, stat.S_IMODE(int(mode or "420")))
    os.utime(path, (mtime, mtime))
    await stream.write(b"OKAY" + bytes(4))


def prepare(root: Path, data_kib: int | None) -> None:
    """Mount what the root needs (this mount namespace only), then chroot into it."""
    mounts = [["-t", "proc", "proc", root / "proc"], ["-t", "sysfs", "sysfs", root / "sys"],
              ["--bind", "/dev", root / "dev"],
              ["--bind", root / ".rig" / "cpuinfo", root / "proc" / "cpuinfo"]]
    if data_kib is not None:
        mounts.append(["-t", "tmpfs", "-o", f"size={data_kib}k", "tmpfs",
                       root / "data" / "local" / "tmp"])
    for args in mounts:
        subprocess.run(["mount", *map(str, args)], check=True)
    os.chroot(root)
    os.chdir("/")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True, help="the arm64 root (tests/device/rig.py)")
    p.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any free)")
    p.add_argument("--mode", choices=("device", "unauthorized", "offline"), default="device")
    p.add_argument("--data-kib", type=int, help="mount a tmpfs of this size on /data/local/tmp")
    p.add_argument("--lifetime", type=float, default=1800, help="exit after this many seconds")
    p.add_argument("--cpu", default=DEFAULT_CPU, help="the CPU qemu-user emulates (QEMU_CPU)")
    args = p.parse_args()
    ENV["QEMU_CPU"] = args.cpu
    prepare(args.root.resolve(), args.data_kib)
    server = await asyncio.start_server(
        lambda r, w: Connection(r, w, args.mode).serve(), "127.0.0.1", args.port)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.wait_for(server.serve_forever(), args.lifetime)
    except TimeoutError:
        sys.exit("adbd: lifetime over")


if __name__ == "__main__":
    asyncio.run(main())
