"""Jobs of ``benchmarks/accuracy/accuracy.py`` and running many of them at once on one GPU (``--parallel N``).

A job is one training run: a group of methods that share it, a seed, a learning rate, a step count and a recipe.
With ``--parallel N`` the parent writes the plan to ``OUT/plans/<time>.json`` and starts N worker processes of the
same command; each loads the model once, then claims jobs one at a time (an ``O_EXCL`` claim file per job, so no
job runs twice) and appends its records to ``OUT/results.jsonl`` under a file lock. Small models leave the GPU
idle while Python launches kernels, so separate processes (each with its own interpreter) fill it; with CUDA MPS up
(``--mps`` starts it for the call) their kernels run concurrently rather than time-sliced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

GIB = 2**30
GPU_GIB_PER_WORKER = 6.0  # SmolLM2 runs peak at ~4 GiB plus the CUDA context


@dataclasses.dataclass(frozen=True)
class Job:
    """One training run (``methods`` share it) and the settings it overrides."""

    methods: tuple[str, ...]
    seed: int
    lr: float
    steps: int
    recipe: str = "default"

    @property
    def label(self) -> str:
        return f"{'+'.join(self.methods)} seed {self.seed} lr {self.lr:g} steps {self.steps} {self.recipe}"


def auto_parallel(device: str, jobs: int) -> int:
    """Workers that fit: one per CPU core but one, and ``GPU_GIB_PER_WORKER`` of free GPU memory each (1 on CPU)."""
    if not device.startswith("cuda"):
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info()
    by_memory = int(free / (GPU_GIB_PER_WORKER * GIB))
    by_cores = max(1, (os.cpu_count() or 2) - 1)
    return max(1, min(by_memory, by_cores, jobs))


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon is up (its pipe directory holds ``control``): then the workers' kernels
    share the GPU; without it they time-slice."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipes, "control"))


@contextlib.contextmanager
def mps_daemon(log: Callable[[str], None]) -> Iterator[bool]:
    """A CUDA MPS control daemon for the duration: started here unless one is up, and then stopped at the end. Yields
    whether MPS is up; when it cannot start, says why and yields False (the workers then time-slice the GPU)."""
    if mps_running():
        yield True
        return
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        log("CUDA MPS: nvidia-cuda-mps-control is not on PATH; the workers will time-slice the GPU")
        yield False
        return
    started = subprocess.run([control, "-d"], capture_output=True, text=True, check=False)
    wait_until = time.time() + 5.0
    while not mps_running() and time.time() < wait_until:
        time.sleep(0.1)
    up = mps_running()
    if not up:
        why = started.stderr.strip() or f"exit code {started.returncode}"
        log(f"CUDA MPS did not start ({why}); the workers will time-slice the GPU")
    try:
        yield up
    finally:
        if up:
            subprocess.run([control], input="quit\n", capture_output=True, text=True, check=False)


def write_plan(out: pathlib.Path, jobs: list[Job]) -> pathlib.Path:
    """The plan file (atomically written) whose claims directory workers share."""
    plans = out / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path, n = plans / f"{stem}.json", 0
    while path.exists():  # a second round within the same second
        n += 1
        path = plans / f"{stem}.{n}.json"
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps([dataclasses.asdict(job) for job in jobs]), encoding="utf-8")
    os.replace(tmp, path)
    path.with_suffix(".claims").mkdir()
    return path


def read_plan(path: pathlib.Path) -> list[Job]:
    return [Job(**{**entry, "methods": tuple(entry["methods"])}) for entry in json.loads(path.read_text())]


def claim(plan: pathlib.Path, index: int, worker: int) -> bool:
    """True for exactly one caller per ``(plan, index)``."""
    try:
        fd = os.open(plan.with_suffix(".claims") / str(index), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(worker).encode())
    os.close(fd)
    return True


def unclaimed(plan: pathlib.Path, jobs: list[Job]) -> list[Job]:
    claims = plan.with_suffix(".claims")
    return [job for index, job in enumerate(jobs) if not (claims / str(index)).exists()]


def launch_workers(argv: list[str], plan: pathlib.Path, workers: int, deadline: float | None) -> list[int]:
    """Run ``workers`` copies of ``accuracy.py argv --plan-file plan --worker-id i``; their exit codes.

    Each worker writes its stdout and stderr to ``<plan>.logs/worker-<i>.log`` (one writer per file: progress bars
    of one worker cannot split another's lines); this process echoes their complete lines as they come. A worker
    that fails does not stop the others (its claimed job is lost, the rest of the plan is still served).
    """
    script = pathlib.Path(__file__).with_name("accuracy.py")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    extra = ["--deadline", repr(deadline)] if deadline else []
    logs = plan.with_suffix(".logs")
    logs.mkdir(exist_ok=True)
    procs, files = [], []
    for i in range(workers):
        files.append(open(logs / f"worker-{i}.log", "wb"))  # closed below
        cmd = [sys.executable, str(script), *argv, "--plan-file", str(plan), "--worker-id", str(i), *extra]
        procs.append(subprocess.Popen(cmd, env=env, stdout=files[-1], stderr=subprocess.STDOUT))
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    echo = LogEcho(sorted(logs.glob("worker-*.log")))
    try:
        while any(proc.poll() is None for proc in procs):
            echo.step()
            time.sleep(1.0)
        echo.step()
        codes = [proc.returncode for proc in procs]
        for i, code in enumerate(codes):
            if code:
                print("\n".join(failure_report(logs / f"worker-{i}.log", i, code)), flush=True)
        return codes
    finally:  # stopped (timeout, Ctrl-C): the workers stop too; the records they appended stay
        signal.signal(signal.SIGTERM, previous)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for handle in files:
            handle.close()


def failure_report(log: pathlib.Path, worker: int, code: int, lines: int = 20) -> list[str]:
    """Lines that say a worker failed: its exit code and the last ``lines`` lines of its log (a traceback has no
    ``[wN]`` prefix, so the echo never printed it), each with the worker's prefix."""
    text = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.exists() else []
    tail = [f"[w{worker}] | {line}" for line in text[-lines:]]
    return [f"[w{worker}] exited with code {code}; the end of {log.name}:", *tail]


class LogEcho:
    """Prints the new complete lines of the worker logs that contain the workers' own ``[wN]`` prefix."""

    def __init__(self, paths: list[pathlib.Path]) -> None:
        self.offsets = dict.fromkeys(paths, 0)

    def step(self) -> None:
        for path, offset in self.offsets.items():
            with open(path, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
            end = chunk.rfind(b"\n") + 1
            self.offsets[path] = offset + end
            for line in chunk[:end].decode("utf-8", "replace").splitlines():  # also splits progress bars' \r
                if line.startswith("[w"):
                    print(line, flush=True)
