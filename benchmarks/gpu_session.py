"""Issue 7's GPU measurements as one command, inside one device call (about 9 minutes by default).

    python benchmarks/gpu_session.py --out "$OUT" --packed .gpu/c100 --data-dir /tmp/cifar100

Phases, each under its own time limit so that a slow one cannot eat the others, all logged into ``--out``:

1. ``env.txt``: GPU, driver, jax/flax/torch versions.
2. smoke: a tiny DE-MKD step through ``step_speed.py`` (stops the session early on an API break, e.g. a newer
   jax on the device than the one the project was tested with).
3. ``step_speed.jsonl``: the headline command (batch 64, float32, every variant), then the DE-MKD step with
   teachers vmapped and looped at batch 256 and 1024 in float32 and bfloat16.
4. ``torch_reference.jsonl``: the PyTorch reference on the same card (``demkd``, ``demkd_logits``), real
   CIFAR-100 batches through DataLoader workers.
5. ``recipe.log``: the paper recipe 3 x vgg13 -> vgg8 on CIFAR-100 (``configs/vgg8.py``): the teacher
   ensemble for ``--teacher-epochs``, then the DE-MKD student on its 240-epoch schedule until the time
   budget runs out (checkpointed; a later call with the same ``--workdir`` resumes it).

The recipe's per-epoch ``metrics.jsonl`` files are copied next to the logs (``recipe_metrics.jsonl``,
``teacher_metrics.jsonl``), and ``summary.json`` holds the JAX/PyTorch ratio at batch 64, the best JAX
throughput, and the recipe's epoch times, accuracy reached and projected time of all 240 student epochs.

Data: ``--data-dir`` holds ``cifar100_{train,test}.npz``; with ``--packed DIR`` the three parts written by
``python3 ../shared/data/cifar100_pack.py pack --src ../shared/data/cifar100 --out .gpu/c100`` are unpacked
there first by ``--pack-script`` (copy that script to ``.gpu/`` so it travels). The device image lacks
ml_collections: carry its wheel (``.gpu/whl``) and install it with ``pip install --no-index --target``. Each
device call carries at most 64 MiB, so send part0 and part1 in two quick calls first (they stay while the
machine is warm), then part2 with this command. On a CPU the same command is a dry run (``--width 0.125
--teacher-epochs 1 --budget 1000 --torch-steps 3``).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_logged(cmd: list[str], log: pathlib.Path, timeout_s: float, stdout_to: pathlib.Path | None = None) -> dict:
    """Runs ``cmd`` from the repo root, appending its output to ``log``; kills it after ``timeout_s`` seconds.

    ``stdout_to``: the command's stdout (JSON lines) is appended to this file instead, and echoed at the end.
    Returns ``{"cmd", "rc", "seconds", "timed_out"}``; rc is None when the time ran out.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    t0 = time.monotonic()
    start = stdout_to.stat().st_size if stdout_to and stdout_to.is_file() else 0
    with open(log, "a") as log_f, open(stdout_to or os.devnull, "a") as out_f:
        log_f.write(f"$ {shlex.join(cmd)}\n")
        log_f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_f if stdout_to else log_f, stderr=log_f,
                                start_new_session=True)  # its own process group: DataLoader workers go too
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if stdout_to:
        with open(stdout_to) as f:
            f.seek(start)
            print(f.read(), end="", flush=True)
    result = {"cmd": shlex.join(cmd), "rc": None if timed_out else proc.returncode,
              "seconds": round(time.monotonic() - t0, 1), "timed_out": timed_out}
    print(f"# {result}", flush=True)
    return result


def read_jsonl(path: pathlib.Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def summarize(step_rows: list[dict], torch_rows: list[dict], student_epochs: list[dict],
              teacher_epochs: list[dict], total_epochs: int = 240, width: float = 1.0) -> dict:
    """The summary figures of the GPU session, from the phases' outputs (missing phases give None).

    The JAX/PyTorch ratio needs the same models on both sides: none at another ``width`` (a dry run).
    """
    demkd64 = [r for r in step_rows if r.get("name") == "demkd" and r.get("features") and r.get("batch") == 64
               and r.get("dtype") == "float32" and r.get("num_seeds", 1) == 1]
    jax_best = max(demkd64, key=lambda r: r["img_per_s"], default=None)
    torch_demkd = next((r for r in torch_rows if r.get("mode") == "demkd"), None)
    out = {
        "jax_demkd_b64_f32": None if jax_best is None else {
            k: jax_best.get(k) for k in ("img_per_s", "ms_per_step", "teachers_execution", "device", "jax_version")},
        "torch_demkd_b64_f32": None if torch_demkd is None else {
            k: torch_demkd.get(k) for k in ("img_per_s", "ms_per_step", "device_name", "torch_version")},
        "width": width,
        "ratio_jax_to_torch": (round(jax_best["img_per_s"] / torch_demkd["img_per_s"], 2)
                               if jax_best and torch_demkd and width == 1.0 else None),
        "jax_best_any_batch": max(({k: r.get(k) for k in ("name", "batch", "dtype", "teachers_execution",
                                                          "img_per_s", "ms_per_step")}
                                   for r in step_rows if r.get("name") == "demkd" and r.get("features")),
                                  key=lambda r: r["img_per_s"], default=None),
    }

    def epochs_summary(rows: list[dict], total: int) -> dict | None:
        if not rows:
            return None
        times = [r["epoch_time_s"] for r in rows if "epoch_time_s" in r]
        steady = times[1:] or times  # the first epoch carries compilation
        median = statistics.median(steady) if steady else None
        return {"epochs_done": rows[-1]["epoch"], "epochs_total": total, "epoch_time_s_median": median,
                "img_per_s_last": rows[-1].get("img_per_s"), "test_acc_last": rows[-1].get("test_acc"),
                "best_test_acc": rows[-1].get("best_test_acc"),
                "projected_total_min": None if median is None else round(median * total / 60, 1)}

    out["recipe_teachers"] = epochs_summary(teacher_epochs, teacher_epochs[-1]["epoch"] if teacher_epochs else 0)
    out["recipe_student"] = epochs_summary(student_epochs, total_epochs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the logs and summary.json (e.g. $OUT)")
    p.add_argument("--data-dir", default="/tmp/cifar100", help="holds cifar100_{train,test}.npz")
    p.add_argument("--packed", default="", help="folder of part0..part2 to unpack into --data-dir first")
    p.add_argument("--pack-script", default=".gpu/cifar100_pack.py")
    p.add_argument("--workdir", default="/tmp/demkd_recipe", help="the recipe's run (resumed if present)")
    p.add_argument("--budget", type=float, default=540, help="seconds for all phases together")
    p.add_argument("--speed-seconds", type=float, default=240, help="both step_speed runs together")
    p.add_argument("--torch-seconds", type=float, default=90, help="both PyTorch modes together")
    p.add_argument("--teacher-epochs", type=int, default=5,
                   help="enough to time the teachers; the student's epoch time is what the 240-epoch goal needs")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier (a CPU dry run: 0.125)")
    p.add_argument("--torch-steps", type=int, default=50)
    args = p.parse_args(argv)

    t_start = time.monotonic()
    left = lambda: args.budget - (time.monotonic() - t_start)  # noqa: E731
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "session.log"
    py = sys.executable
    data = pathlib.Path(args.data_dir)
    phases = {}

    env_cmd = ("nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; "
               f"{shlex.quote(py)} -c \"import jax, flax, optax, orbax.checkpoint as o; "
               "print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())\"; "
               f"{shlex.quote(py)} -c \"import torch; print('torch', torch.__version__, torch.cuda.is_available())\"")
    phases["env"] = run_logged(["bash", "-c", env_cmd], out / "env.txt", 60)

    if args.packed and not (data / "cifar100_train.npz").is_file():
        phases["unpack"] = run_logged([py, args.pack_script, "unpack", "--src", args.packed, "--out", str(data)],
                                      log, 120)

    step_speed = [py, "benchmarks/step_speed.py", "--config", "configs/vgg8.py"]
    phases["smoke"] = run_logged([*step_speed, "--width", "0.125", "--batch", "8", "--dtype", "float32", "--steps",
                                  "2", "--warmup", "1", "--variants", "demkd_loop", "--dataset-size", "64"], log, 120)
    if phases["smoke"]["rc"] != 0:
        print("smoke test failed: see session.log", file=sys.stderr)
        (out / "summary.json").write_text(json.dumps({"phases": phases}, indent=1))
        return 1

    speed = [*step_speed, "--width", str(args.width)]
    step_file = out / "step_speed.jsonl"
    t_speed = time.monotonic()
    phases["step_speed_b64"] = run_logged([*speed, "--batch", "64", "--dtype", "float32"], log,
                                          min(args.speed_seconds, left()), step_file)
    phases["step_speed_large"] = run_logged(
        [*speed, "--batch", "256", "1024", "--dtype", "float32", "bfloat16", "--variants", "demkd_vmap", "demkd_loop"],
        log, max(10.0, min(args.speed_seconds - (time.monotonic() - t_speed), left())), step_file)

    torch_file = out / "torch_reference.jsonl"
    train_npz = data / "cifar100_train.npz"
    torch_data = ["--data", "cifar100", "--data-path", str(train_npz)] if train_npz.is_file() else ["--data", "synthetic"]
    t_torch = time.monotonic()
    for mode in ("demkd", "demkd_logits"):
        phases[f"torch_{mode}"] = run_logged(
            [py, "benchmarks/torch_reference.py", "--mode", mode, "--steps", str(args.torch_steps), "--warmup", "10",
             *torch_data], log, max(10.0, min(args.torch_seconds - (time.monotonic() - t_torch), left())), torch_file)

    workdir = pathlib.Path(args.workdir)
    if (data / "cifar100_train.npz").is_file():
        recipe = [py, "-m", "demkd_jax.main", "--config", "configs/vgg8.py", "--workdir", str(workdir),
                  "--config.data.source=npz", f"--config.data.path={data}", "--config.progress_bar=False",
                  f"--config.teachers.num_epochs={args.teacher_epochs}",
                  f"--config.student.width={args.width}", f"--config.teachers.width={args.width}"]
        phases["recipe"] = run_logged(recipe, out / "recipe.log", max(10.0, left() - 15))
    else:
        phases["recipe"] = {"skipped": f"no CIFAR-100 in {data} (give --data-dir or --packed)"}

    # The recipe's per-epoch records travel back with the rest (a device call returns files under $OUT only).
    for src, name in ((workdir / "metrics.jsonl", "recipe_metrics.jsonl"),
                      (workdir / "teachers" / "metrics.jsonl", "teacher_metrics.jsonl")):
        if src.is_file():
            shutil.copyfile(src, out / name)
    summary = summarize(read_jsonl(step_file), read_jsonl(torch_file), read_jsonl(out / "recipe_metrics.jsonl"),
                        read_jsonl(out / "teacher_metrics.jsonl"), width=args.width)
    summary["phases"] = phases
    summary["wall_s"] = round(time.monotonic() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "phases"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
