"""A minimal stand-in for the ``adb`` client (a test double, until the emulated arm64 device of
the device-rig issue lands): it keeps a "phone" as a folder and runs its shell commands with the
host's sh, so device_eval's whole adb flow (device selection, push, shell, pull, the device-side
runners, cleanup) runs for real on the host side.

It does NOT prove: the adb wire protocol or the real client's behaviour, USB, authorization
prompts, Android's toybox shell and filesystem, arm64 builds of the runtimes, phone timing.

State (in $FAKE_ADB_ROOT): ``devices`` (lines ``SERIAL STATE``), ``fs/`` (the phone's files; the
device path /data/local/tmp is fs/data/local/tmp), ``abilist`` (default arm64-v8a), ``free_kb``
(what df reports, default 10 GB), ``hang`` (if present, runner invocations sleep), ``bin/`` (put
first on the phone's PATH).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(os.environ["FAKE_ADB_ROOT"])
FS = ROOT / "fs"


def local(remote: str) -> Path:
    return FS / remote.lstrip("/")


def rewrite(command: str) -> str:
    return command.replace("/data/local/tmp", str(FS / "data" / "local" / "tmp"))


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(1)


def main() -> None:
    args = sys.argv[1:]
    devices = dict(line.split() for line in (ROOT / "devices").read_text().splitlines()
                   if line.strip())
    serial = None
    if args[:1] == ["-s"]:
        serial, args = args[1], args[2:]
    cmd, rest = args[0], args[1:]
    if cmd == "devices":
        print("List of devices attached")
        for s, state in devices.items():
            print(f"{s}\t{state}")
        return
    if cmd == "version":
        print("Android Debug Bridge version 1.0.41 (test double)")
        return
    if serial is None and len(devices) != 1:
        fail("adb: more than one device/emulator" if devices else "adb: no devices/emulators found")
    serial = serial or next(iter(devices))
    if serial not in devices or devices[serial] != "device":
        fail(f"adb: device '{serial}' not found")
    if cmd == "push":
        src, dst = Path(rest[0]), local(rest[1])
        if (ROOT / "full").exists():
            fail(f"adb: error: failed to copy '{src}' to '{rest[1]}': remote No space left on "
                 "device")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        print(f"{src}: 1 file pushed")
        return
    if cmd == "pull":
        src, dst = local(rest[0]), Path(rest[1])
        if not src.exists():
            fail(f"adb: error: failed to stat remote object '{rest[0]}': No such file or "
                 "directory")
        if src.is_dir():
            shutil.copytree(src, dst / src.name if dst.is_dir() else dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
        return
    if cmd == "shell":
        command = " ".join(rest)
        if command.startswith("getprop"):
            abis = ROOT / "abilist"
            print(abis.read_text().strip() if abis.exists() else "arm64-v8a")
            return
        if command.startswith("df"):
            free = ROOT / "free_kb"
            kb = int(free.read_text()) if free.exists() else 10 << 20
            print("Filesystem 1K-blocks Used Available Use% Mounted on")
            print(f"/dev/block/dm-0 {kb * 2} {kb} {kb} 50% /data")
            return
        if (ROOT / "hang").exists() and ("device_runner" in command or "run.sh" in command):
            command = f"sleep 30; true # {command}"  # sh stays the parent, as on a phone
        env = {**os.environ, "PATH": f"{ROOT / 'bin'}:{os.environ['PATH']}"}
        r = subprocess.run(["sh", "-c", rewrite(command)], env=env, cwd=FS)
        sys.exit(r.returncode)
    fail(f"adb: unknown command {cmd}")


if __name__ == "__main__":
    main()
