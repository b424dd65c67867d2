"""Start the ``imbssl`` command with tcmalloc preloaded where it is installed.

glibc's malloc hands the many short-lived, mid-sized buffers of a training step back to the kernel and asks
for them again; tcmalloc keeps them in per-thread caches. On 2-core CPUs that measured +6-40% img/s
(docs/benchmarks.md). A preload has to be in place before the process starts, so ``main`` re-executes the
command once, with the library in LD_PRELOAD. ``IMBSSL_TCMALLOC=0`` turns this off, ``1`` (or unset) looks for
it where distributions install it, ``IMBSSL_TCMALLOC=PATH`` names the library. An LD_PRELOAD that already names
a tcmalloc is left alone (that also ends the re-execution).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

#: where distributions install it: Debian/Ubuntu (apt-get install libtcmalloc-minimal4) and Fedora/RHEL
#: (dnf install gperftools-libs)
CANDIDATES = tuple(f"/usr/{lib}/libtcmalloc{kind}.so.4"
                   for lib in ("lib/x86_64-linux-gnu", "lib/aarch64-linux-gnu", "lib64", "lib")
                   for kind in ("_minimal", ""))
SWITCH = "IMBSSL_TCMALLOC"
#: set in the re-executed process: it never re-executes again, whatever LD_PRELOAD names
RELAUNCHED = "IMBSSL_TCMALLOC_RELAUNCHED"


def tcmalloc_library(environ: dict[str, str] = os.environ) -> str | None:
    """The library to preload: IMBSSL_TCMALLOC's path, else the first installed candidate; None if off or absent."""
    choice = environ.get(SWITCH, "")
    if choice == "0":
        return None
    if choice not in ("", "1"):
        return choice if Path(choice).is_file() else None
    return next((path for path in CANDIDATES if Path(path).is_file()), None)


def preloaded(environ: dict[str, str] = os.environ) -> bool:
    """Whether LD_PRELOAD asks for a tcmalloc; ``loaded()`` says whether one is in this process."""
    return "tcmalloc" in environ.get("LD_PRELOAD", "")


def loaded() -> bool:
    """Whether a tcmalloc is mapped into this process (the loader skips a preload it cannot use, with a warning)."""
    try:
        return "tcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def relaunch_with_tcmalloc() -> None:
    """Re-execute this process (same interpreter, same command line) with tcmalloc preloaded; return if that is
    not wanted, not possible or already done."""
    if (not sys.platform.startswith("linux") or RELAUNCHED in os.environ or preloaded()
            or (library := tcmalloc_library()) is None):
        return
    env = {**os.environ, "LD_PRELOAD": " ".join(filter(None, (library, os.environ.get("LD_PRELOAD")))),
           RELAUNCHED: "1",
           # tcmalloc reports every allocation over 1 GiB on stderr; decoding ImageNet-scale sets makes many
           "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD",
                                                                   str(1 << 40))}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # an interpreter that cannot be re-executed: run on with the default allocator
        return
