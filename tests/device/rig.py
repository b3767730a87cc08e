"""The emulated arm64 phone of the adb tests: its root file system, the stand-in adbd serving it
(tests/device/adbd.py) and a private server of the real adb client.

    python -m tests.device.rig build          # build or refresh .cache/device-root

The root is Debian (debootstrap --arch=arm64 --variant=minbase) with python3 and procps, the
host's pinned numpy, onnxruntime and ai-edge-litert as manylinux aarch64 wheels (installed by
the host's pip with --platform --target: pip in the root would have no CA for the registry's
proxy), an ARM /proc/cpuinfo for adbd to mount (both runtimes crash at import under qemu-user
on the host's x86 one), and the Android paths device_eval uses: /system/bin/sh, a getprop that
answers ro.product.cpu.abilist, /data/local/tmp. A stamp of the recipe marks a finished root;
a root with another stamp is rebuilt. Needs root (debootstrap, chroot, mount namespaces),
debootstrap, qemu-user-static and binfmt-support (Debian: apt install debootstrap
qemu-user-static binfmt-support adb).
"""

import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO / ".cache" / "device-root"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
DEBIAN_PACKAGES = ("python3", "procps")
PYTHON = "3.11"  # bookworm's python3
RUNTIMES = ("numpy", "onnxruntime", "ai-edge-litert", "ml-dtypes")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux2014_aarch64")
ABILIST = "arm64-v8a"
CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 "
    "crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n"
    for i in range(4))
GETPROP = f"""#!/bin/sh
case "$1" in
  ro.product.cpu.abilist) echo {ABILIST} ;;
  ro.product.model) echo arm64_qemu_user ;;
  *) echo ;;
esac
"""
STAMP = ".rig/recipe.json"
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def runtime_pins() -> list[str]:
    """The host's pins of the runtimes, from pyproject.toml: the phone runs the same versions."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if d.split("==")[0].lower().replace("_", "-") in RUNTIMES]
    if len(pins) != len(RUNTIMES):
        raise SystemExit(f"pyproject.toml pins {pins}, expected one pin for each of {RUNTIMES}")
    return pins


def recipe() -> dict:
    """What the root is built from, as stored in its stamp (JSON types)."""
    return json.loads(json.dumps({"suite": SUITE, "debian": DEBIAN_PACKAGES, "python": PYTHON,
            "wheels": runtime_pins(), "platforms": PLATFORMS, "cpuinfo": CPUINFO,
            "getprop": GETPROP}))


def is_ready(root: Path) -> bool:
    try:
        return json.loads((root / STAMP).read_text()) == recipe()
    except (OSError, ValueError):
        return False


def missing_prerequisites(tools: tuple[str, ...] = ("adb", "unshare", "chroot", "mount")
                          ) -> list[str]:
    """What this machine lacks to run ``tools`` in the rig (empty when it can)."""
    missing = [f"the {tool} command" for tool in tools if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (chroot and mount namespaces)")
    elif not enable_binfmt():
        missing.append("binfmt_misc with qemu-aarch64 (apt install qemu-user-static "
                       "binfmt-support)")
    return missing


def enable_binfmt() -> bool:
    """Make arm64 ELF files run through qemu-user (mounting binfmt_misc if needed)."""
    entry = BINFMT / "qemu-aarch64"
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                       capture_output=True)
    if not entry.exists() and shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", "qemu-aarch64"], capture_output=True)
    return entry.exists() and entry.read_text().startswith("enabled")


def _step(title: str, argv: list[str], log: Path) -> None:
    start = time.monotonic()
    print(f"  {title} ...", end="", flush=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n")
        f.flush()
        r = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        print(" failed")
        raise SystemExit(f"{title} failed (exit {r.returncode}); see {log}")
    print(f" {time.monotonic() - start:.0f} s", flush=True)


def build(root: Path) -> None:
    """Build the root in a sibling folder and move it into place when complete."""
    if missing := missing_prerequisites(("debootstrap", "chroot", "mount")):
        raise SystemExit("cannot build the device root: missing " + "; ".join(missing) +
                         " (apt install debootstrap qemu-user-static binfmt-support)")
    start = time.monotonic()
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log = root.with_name(root.name + ".log")
    log.write_text("")
    print(f"building the arm64 device root in {root} (log: {log})", flush=True)
    _step("debootstrap arm64 " + ",".join(DEBIAN_PACKAGES),
          ["debootstrap", "--arch=arm64", "--variant=minbase",
           f"--include={','.join(DEBIAN_PACKAGES)}", SUITE, str(tmp), MIRROR], log)
    site = tmp / "usr" / "local" / "lib" / f"python{PYTHON}" / "dist-packages"
    _step("aarch64 wheels " + " ".join(runtime_pins()),
          [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--target", str(site), *(f"--platform={p}" for p in PLATFORMS),
           f"--python-version={PYTHON}", "--implementation=cp", "--only-binary=:all:",
           *runtime_pins()], log)
    shutil.rmtree(tmp / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (tmp / "system" / "bin").mkdir(parents=True)
    (tmp / "system" / "bin" / "sh").symlink_to("/bin/sh")
    getprop = tmp / "system" / "bin" / "getprop"
    getprop.write_text(GETPROP)
    getprop.chmod(0o755)
    (tmp / "data" / "local" / "tmp").mkdir(parents=True)
    (tmp / "data" / "local" / "tmp").chmod(0o1777)
    (tmp / ".rig").mkdir()
    (tmp / ".rig" / "cpuinfo").write_text(CPUINFO)
    (tmp / STAMP).write_text(json.dumps(recipe()))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    print(f"device root ready in {time.monotonic() - start:.0f} s", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies, so a
    killed test run leaves no daemon behind (prctl PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


class Device:
    """The stand-in adbd in private mount and pid namespaces, on a free loopback port."""

    def __init__(self, root: Path, mode: str = "device", data_kib: int | None = None,
                 lifetime: float = 1800, start_timeout: float = 30) -> None:
        argv = ["unshare", "--mount", "--pid", "--fork", "--kill-child", sys.executable,
                str(Path(__file__).with_name("adbd.py")), "--root", str(root), "--mode", mode,
                "--lifetime", str(lifetime)]
        if data_kib is not None:
            argv += ["--data-kib", str(data_kib)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True,
                                     preexec_fn=_die_with_parent)
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"adbd did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.serial = f"127.0.0.1:{int(line.split()[1])}"

    def stop(self) -> None:
        """Kill the daemon; the kernel then kills everything in its pid namespace."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


class AdbServer:
    """The real adb client with its own server on a private port and a private key folder."""

    def __init__(self, home: Path) -> None:
        self.env = {"ANDROID_ADB_SERVER_PORT": str(free_port()), "HOME": str(home)}
        self.adb("start-server")

    def adb(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["adb", *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env}, stdin=subprocess.DEVNULL)

    def states(self) -> dict[str, str]:
        lines = self.adb("devices").stdout.splitlines()[1:]
        return dict(line.split()[:2] for line in lines if len(line.split()) >= 2)

    def connect(self, device: Device, state: str = "device", timeout: float = 30) -> None:
        """``adb connect`` and wait until ``adb devices`` shows the device in ``state``.

        The client waits 10 s for a device that never answers; the server keeps listing it
        (as offline) when the client is stopped early, so it is stopped once the state shows.
        """
        client = subprocess.Popen(["adb", "connect", device.serial], env={**os.environ,
                                  **self.env}, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while (seen := self.states().get(device.serial)) != state:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{device.serial} is {seen!r} after {timeout:g} s, "
                                       f"expected {state!r}")
                time.sleep(0.2)
        finally:
            client.kill()
            client.wait(timeout=30)

    def disconnect(self, device: Device) -> None:
        self.adb("disconnect", device.serial)

    def stop(self) -> None:
        self.adb("kill-server")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.device.rig", description=__doc__)
    p.add_argument("command", choices=("build",))
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    p.add_argument("--force", action="store_true", help="rebuild even if the root is current")
    args = p.parse_args()
    if is_ready(args.root) and not args.force:
        print(f"device root {args.root} is current (recipe unchanged); nothing to build")
        return
    build(args.root)


if __name__ == "__main__":
    main()
