"""A delaying IP switch between network namespaces, for kernels without `sch_netem`.

Each namespace gets a TUN device (`t0`, one address of a shared /24); this process reads every IP packet
a namespace sends, holds it for the one-way delay and writes it into the destination namespace's device.
The packets are the kernels' own (TCP handshakes, windows and retransmissions are real), so the sites see
a metro network's latency as `tc netem delay` would give it. Order is kept per destination.

    python tests/netdelay.py --delay-ms 5 NS1=10.88.0.1 NS2=10.88.0.2 ...

prints "ready" once every device is up, and runs until killed.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import fcntl
import os
import struct
import subprocess
import sys

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
MTU = 65000  # big frames: fewer packets for this process to move, as with segmentation offload


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def open_tun(ns: str, name: str = "t0") -> int:
    """A TUN device named NAME inside namespace NS; the fd keeps working after we leave it."""
    home = f"/proc/{os.getpid()}/task/{os.getpid()}/ns/net"
    back = os.open(home, os.O_RDONLY)
    try:
        _setns(f"/var/run/netns/{ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(back, CLONE_NEWNET)
        os.close(back)
    return fd


class Switch:
    """Reads packets from every device and delivers each to its destination's device DELAY seconds later."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fds: dict[bytes, int], delay: float):
        self.loop, self.fds, self.delay = loop, fds, delay
        self.queues: dict[int, collections.deque[tuple[float, bytes]]] = {fd: collections.deque() for fd in
                                                                          fds.values()}
        self.armed: set[int] = set()
        for fd in fds.values():
            loop.add_reader(fd, self.receive, fd)

    def receive(self, src: int) -> None:
        due = self.loop.time() + self.delay
        while True:
            try:
                pkt = os.read(src, MTU + 64)
            except BlockingIOError:
                return
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                continue  # IPv4 only: the sites use nothing else
            dst = self.fds.get(pkt[16:20])
            if dst is None or dst == src:
                continue
            self.queues[dst].append((due, pkt))
            if dst not in self.armed:
                self.armed.add(dst)
                self.loop.call_at(due, self.deliver, dst)

    def deliver(self, dst: int) -> None:
        queue, now = self.queues[dst], self.loop.time()
        while queue and queue[0][0] <= now:
            with contextlib.suppress(OSError):  # a full device queue drops, as a link would; TCP resends
                os.write(dst, queue.popleft()[1])
        if queue:
            self.loop.call_at(queue[0][0], self.deliver, dst)
        else:
            self.armed.discard(dst)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay-ms", type=float, required=True)
    ap.add_argument("--prefix", type=int, default=24)
    ap.add_argument("sites", nargs="+", metavar="NS=ADDR")
    args = ap.parse_args(argv)
    fds: dict[bytes, int] = {}
    for spec in args.sites:
        ns, addr = spec.split("=", 1)
        fd = open_tun(ns)
        for cmd in (("addr", "add", f"{addr}/{args.prefix}", "dev", "t0"),
                    ("link", "set", "t0", "mtu", str(MTU), "up")):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True, timeout=30)
        fds[bytes(int(x) for x in addr.split("."))] = fd
    loop = asyncio.new_event_loop()
    Switch(loop, fds, args.delay_ms / 1000)
    print("ready", flush=True)
    loop.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
