#!/usr/bin/python3
"""The weather example in one command: an ERA5-like NetCDF file, two PyTorch checkpoints (ClimaX
and D-CHAG-C) with PyTorch's tokens, their conversion to safetensors, and dchag_weather on --np
ranks, all in a work directory.

    /usr/bin/python3 examples/weather/run_weather.py [--work-dir build/weather] [--build build]
        [--lat 32] [--lon 64] [--times 24] [--step-hours 6] [--dim 128] [--heads 8] [--patch 2]
        [--np 4] [--seed 0] [--mpiexec mpiexec] [--mpiexec-arg=ARG]... [--exe PATH]
        [--expect-missing NAME]

Steps (each command is printed before it runs):
  1. make_era5.py       era5.nc: the 84 inputs (and two the model does not take) at every time
  2. make_models.py     climax.ckpt, dchag_c.ckpt (Lightning-style), variables.txt and
                        reference.safetensors (PyTorch's tokens in float64 and float32)
  3. scripts/convert_checkpoint.py --channels-file variables.txt, for each checkpoint
  4. mpiexec -n NP dchag_weather: D-CHAG-C and exact_flat on the file, tokens.safetensors, and
                        the agreement with PyTorch, held to its float32 bound
Exit status: dchag_weather's (1 when the agreement exceeds its bound), the first failing step's,
or 77 when torch or netCDF4 do not import (ctest: skipped). With --expect-missing NAME the file
dchag_weather reads lacks NAME (the models and references are made from a complete one), and the
run succeeds when dchag_weather refuses it with a message naming NAME.

mpiexec: --mpiexec (default: the one on PATH), started as MPIEXEC --np-flag NP [ARG...] EXE; with
no --mpiexec-arg, --oversubscribe is added for Open MPI. As root, Open MPI also needs
OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the environment.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PYTHON = sys.executable or "/usr/bin/python3"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default=os.path.join(ROOT, "build", "weather"))
    ap.add_argument("--build", default=os.path.join(ROOT, "build"),
                    help="build directory holding examples/weather/dchag_weather")
    ap.add_argument("--exe", help="dchag_weather (default: BUILD/examples/weather/dchag_weather)")
    ap.add_argument("--lat", type=int, default=32)
    ap.add_argument("--lon", type=int, default=64)
    ap.add_argument("--times", type=int, default=24)
    ap.add_argument("--step-hours", type=float, default=6.0)
    ap.add_argument("--noise", type=float, default=1.0)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--patch", type=int, default=2)
    ap.add_argument("--np", type=int, default=4, help="ranks (and D-CHAG partial aggregators)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mpiexec", default=shutil.which("mpiexec") or "mpiexec")
    ap.add_argument("--np-flag", default="-n")
    ap.add_argument("--mpiexec-arg", action="append", default=None, metavar="ARG",
                    help="passed to mpiexec before the program (repeatable; write --mpiexec-arg=X)")
    ap.add_argument("--expect-missing", metavar="NAME",
                    help="leave NAME out of dchag_weather's file and expect a refusal naming it")
    a = ap.parse_args(argv)
    a.exe = a.exe or os.path.join(a.build, "examples", "weather", "dchag_weather")
    if not os.access(a.exe, os.X_OK):
        ap.error(f"{a.exe} not found; build it: cmake --build {a.build} --target dchag_weather")
    if a.mpiexec_arg is None:
        a.mpiexec_arg = ["--oversubscribe"] if open_mpi(a.mpiexec) else []
    a.mpiexec_arg = [x for x in a.mpiexec_arg if x]
    return a


def open_mpi(mpiexec):
    try:
        r = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in r.stdout + r.stderr or "OpenRTE" in r.stdout + r.stderr


def missing_modules():
    missing = []
    for name in ("numpy", "torch", "netCDF4"):
        try:
            __import__(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    return missing


def step(cmd, capture=False):
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, text=True, capture_output=capture)
    if capture:
        sys.stdout.write(r.stdout)
        sys.stdout.write(r.stderr)
    print(f"  ({time.perf_counter() - t0:.1f} s, exit {r.returncode})", flush=True)
    return r


def main(argv=None):
    a = parse(argv)
    missing = missing_modules()
    if missing:
        print(f"run_weather.py: skipped: {PYTHON} cannot import {', '.join(missing)}; Debian: "
              "python3-torch, python3-netcdf4 (scripts/install-deps.sh)", file=sys.stderr)
        return 77
    os.makedirs(a.work_dir, exist_ok=True)
    w = lambda name: os.path.join(a.work_dir, name)
    grid = ["--lat", str(a.lat), "--lon", str(a.lon), "--times", str(a.times), "--step-hours",
            str(a.step_hours), "--noise", str(a.noise), "--seed", str(a.seed)]
    steps = [[PYTHON, os.path.join(HERE, "make_era5.py"), w("era5.nc")] + grid]
    data = w("era5.nc")
    if a.expect_missing:
        data = w("era5_incomplete.nc")
        steps.append([PYTHON, os.path.join(HERE, "make_era5.py"), data] + grid +
                     ["--omit", a.expect_missing])
    steps.append([PYTHON, os.path.join(HERE, "make_models.py"), w("era5.nc"), a.work_dir,
                  "--patch", str(a.patch), "--dim", str(a.dim), "--heads", str(a.heads),
                  "--ranks", str(a.np), "--seed", str(a.seed)])
    for name in ("climax", "dchag_c"):
        steps.append([PYTHON, os.path.join(ROOT, "scripts", "convert_checkpoint.py"),
                      w(name + ".ckpt"), w(name + ".safetensors"),
                      "--channels-file", w("variables.txt")])
    for cmd in steps:
        r = step(cmd)
        if r.returncode != 0:
            print(f"run_weather.py: {os.path.basename(cmd[1])} failed (exit {r.returncode})",
                  file=sys.stderr)
            return r.returncode

    run = [a.mpiexec, a.np_flag, str(a.np)] + a.mpiexec_arg + [
        a.exe, "--data", data, "--dchag", w("dchag_c.safetensors"),
        "--climax", w("climax.safetensors"), "--reference", w("reference.safetensors"),
        "--out", w("tokens.safetensors"), "--heads", str(a.heads)]
    r = step(run, capture=bool(a.expect_missing))
    if not a.expect_missing:
        return r.returncode
    said = r.stdout + r.stderr
    if r.returncode != 0 and a.expect_missing in said and "is not in the file" in said:
        print(f"run_weather.py: dchag_weather refused the file without {a.expect_missing}, "
              "as expected")
        return 0
    print(f"run_weather.py: expected dchag_weather to fail naming {a.expect_missing}; it exited "
          f"{r.returncode}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
