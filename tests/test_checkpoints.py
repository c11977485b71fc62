"""Checkpoints, exact resume, stopping on SIGTERM, and the Hugging Face export, on CPU (fp32, tp=2 x dp=2).

  * a run killed with SIGKILL and resumed from its latest checkpoint gives, at every later step, the
    loss of the same run left alone (within 1e-6);
  * the same checkpoint resumed at tp=4 x dp=1 (micro-batch doubled: the same global batch) and at tp=1 x dp=2,
    through a universal checkpoint converted once: every later loss and the final eval within 1e-5 of the
    run left alone, and its export equal to the left-alone run's in plain transformers; a second resume
    reuses the conversion; a conversion killed part-way is redone; the tp=1 x dp=2 run resumes back at
    tp=2 x dp=2 (a checkpoint written at tp 1, where AutoTP left no record); --export_only works from
    either kind;
  * SIGTERM: the ranks agree to stop, save at the step they reached, exit 0; resuming continues exactly;
  * the exported model, loaded by plain transformers in a fresh process (no DeepSpeed), gives the
    sharded model's logits (tests/export_worker.py) and, passed back as --model_name, the training
    run's last eval loss at tp=1 and tp=4;
  * a topology change from ZeRO-0 and a diverging loss each end in one `error:` line (the other bad
    inputs are checked in tests/test_units.py).

Run: python -m pytest tests/test_checkpoints.py -q   (about four minutes on 2 cores)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SCRIPT, TOL, torchrun, run_script, error_line


EXACT = 1e-6  # a resume at the same topology repeats the same arithmetic (TOL: another tp x dp, another order)
# Short fp32 run with a loss every step and a checkpoint every 4 steps; the last step is 14. At 60 tokens
# the embedded text holds out 35 blocks, which neither 2 nor 3 DP ranks divide.
RUN = ["--tp_size", "2", "--dp_size", "2", "--precision", "fp32", "--seq_length", "60", "--num_steps", "14",
       "--learning_rate", "3e-3", "--log_interval", "1", "--eval_interval", "7", "--save_interval", "4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    proc, results = run_script(4, out, cache, *RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, results


def launch(out, cache, *args):
    """torchrun in the background; what it prints goes to out/launch.log."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(SCRIPT),
           "--output_dir", str(out), "--cache_dir", str(cache), *map(str, args)]
    with open(Path(out) / "launch.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def printed(out):
    return (Path(out) / "launch.log").read_text()


def wait_for(proc, condition, what, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def workers_of(pid):
    """The processes torchrun started (what a scheduler signals before preempting a job)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def pointer(out):
    path = Path(out) / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def assert_same_losses_after(resumed, reference, step, tol=EXACT):
    ours = {r["step"]: r["loss"] for r in resumed["train"]}
    theirs = {r["step"]: r["loss"] for r in reference["train"]}
    later = [s for s in theirs if s > step]
    assert later and all(s in ours for s in later), (sorted(ours), later)
    worst = max(abs(ours[s] - theirs[s]) for s in later)
    assert worst < tol, f"max loss difference after resuming at step {step}: {worst:.2e}"
    assert abs(resumed["eval"][-1]["loss"] - reference["eval"][-1]["loss"]) < tol


@pytest.fixture(scope="module")
def killed(tmp_path_factory, cache):
    """RUN killed with SIGKILL once its step-8 checkpoint is complete: (its output dir, the step it saved last)."""
    out = tmp_path_factory.mktemp("killed")
    proc = launch(out, cache, *RUN)
    wait_for(proc, lambda: pointer(out) == "step_0000008", "the step-8 checkpoint")
    for pid in workers_of(proc.pid) + [proc.pid]:  # the workers run in sessions of their own
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # were a worker still alive, it would move the pointer past step 8 now
    saved = int(pointer(out).split("_")[1])
    assert 8 <= saved < 14
    return out, saved


def checkpoints_of(killed, out):
    """A copy of the killed run's checkpoints in out, for one test to resume from; the step saved last."""
    shutil.copytree(killed[0] / "checkpoints", Path(out) / "checkpoints")
    return killed[1]


def test_sigkill_then_resume_gives_the_uninterrupted_losses(tmp_path, cache, uninterrupted, killed):
    _, reference = uninterrupted
    saved = checkpoints_of(killed, tmp_path)
    proc, resumed = run_script(4, tmp_path, cache, *RUN, "--resume_from_checkpoint", "latest")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed["resumed_from"].endswith(f"step_{saved:07d}")
    assert "through a universal checkpoint" not in proc.stdout  # the same topology loads DeepSpeed's directly
    assert_same_losses_after(resumed, reference, saved)
    assert [r["step"] for r in resumed["train"]] == list(range(1, 15))  # the curve carries over


def plain_logits_diff(hf_a, hf_b):
    """Max logit difference of two exported models, each loaded by plain transformers (no DeepSpeed)."""
    proc = subprocess.run([sys.executable, ROOT / "tests" / "plain_worker.py", "models", hf_a, hf_b],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stdout.split()[-1])


def resume_at(out, cache, nproc, tp, dp, batch, *extra):
    """RUN resumed from its step-8 checkpoint (named, not 'latest': later saves do not move what it reads) at
    another tp x dp with the same global batch of 2 sequences."""
    return run_script(nproc, out, cache, *RUN, "--tp_size", tp, "--dp_size", dp, "--batch_size", batch,
                      "--keep_last", "0", "--resume_from_checkpoint", Path(out) / "checkpoints" / "step_0000008", *extra)


def test_resume_at_tp4_dp1_continues_the_run_and_reuses_its_conversion(tmp_path, cache, uninterrupted, killed):
    out, reference = uninterrupted
    checkpoints_of(killed, tmp_path)
    proc, resumed = resume_at(tmp_path, cache, 4, 4, 1, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("step_0000008 was written at tp 2 x dp 2 (ZeRO-2), resuming at tp 4 x dp 1 (ZeRO-2) through a "
            "universal checkpoint") in proc.stdout and "converting" in proc.stdout
    assert resumed["resumed_from"].endswith("step_0000008_universal")
    assert_same_losses_after(resumed, reference, 8, TOL)
    assert plain_logits_diff(tmp_path / "hf", out / "hf") < TOL

    proc, again = resume_at(tmp_path, cache, 4, 4, 1, 2, "--skip_export")  # the same resume, a second time
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing the universal checkpoint" in proc.stdout and "converting" not in proc.stdout
    assert_same_losses_after(again, reference, 8, TOL)


def test_a_conversion_killed_part_way_is_redone_at_tp1_dp2_and_back(tmp_path, cache, uninterrupted, killed):
    _, reference = uninterrupted
    checkpoints_of(killed, tmp_path)
    step8 = tmp_path / "checkpoints" / "step_0000008"
    proc = subprocess.run([sys.executable, ROOT / "tests" / "killed_conversion_worker.py", step8], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = step8.with_name("step_0000008_universal.partial")
    assert any((partial / "tmp").iterdir()) and not step8.with_name("step_0000008_universal").exists()

    proc, resumed = resume_at(tmp_path, cache, 2, 1, 2, 1, "--skip_export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at tp 1 x dp 2 (ZeRO-2)" in proc.stdout and "converting" in proc.stdout
    assert not partial.exists()
    assert_same_losses_after(resumed, reference, 8, TOL)
    # and back to tp 2 x dp 2 from this run's step 12: a checkpoint written at tp 1, where AutoTP left no record
    proc, back = run_script(4, tmp_path, cache, *RUN, "--skip_export", "--resume_from_checkpoint",
                            tmp_path / "checkpoints" / "step_0000012")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written at tp 1 x dp 2 (ZeRO-2), resuming at tp 2 x dp 2" in proc.stdout
    assert_same_losses_after(back, reference, 12, TOL)


def test_export_only_from_a_checkpoint_of_another_topology(tmp_path, cache, killed):
    """The step-8 weights exported at tp=1 x dp=2 (through the universal checkpoint) and at the topology that
    wrote them (directly) are the same model."""
    checkpoints_of(killed, tmp_path)
    exports = []
    for nproc, tp, dp in ((2, 1, 2), (4, 2, 2)):
        out = tmp_path / f"tp{tp}"
        proc, results = run_script(nproc, out, cache, *RUN, "--tp_size", tp, "--dp_size", dp, "--export_only",
                                   "--resume_from_checkpoint", tmp_path / "checkpoints" / "step_0000008")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert results["train"] == [] and ("through a universal checkpoint" in proc.stdout) == (tp == 1)
        exports.append(out / "hf")
    assert plain_logits_diff(*exports) < TOL


def test_zero3_with_the_optimizer_on_the_host_trains_resumes_and_exports_as_zero2_does(tmp_path, cache,
                                                                                        uninterrupted):
    """RUN with ZeRO-3 and the optimizer offloaded (DeepSpeed's CPU Adam on the host): every loss and evaluation
    within 1e-5 of the ZeRO-2 run (other partitions sum in another order) and its export the same model; resumed
    from its step-8 checkpoint at tp 2 x dp 2 exactly (ZeRO-3 and the offload taken from the checkpoint), at
    tp 4 x dp 1 through a universal checkpoint within 1e-5, and at ZeRO-2 refused in one line."""
    out, zero2 = uninterrupted
    proc, zero3 = run_script(4, tmp_path / "z3", cache, *RUN, "--zero_stage", "3", "--offload_optimizer",
                             "--keep_last", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (zero3["deepspeed_config"]["zero_optimization"]["stage"], zero3["args"]["offload_optimizer"]) == (3, True)
    assert_same_losses_after(zero3, zero2, 0, TOL)
    assert plain_logits_diff(tmp_path / "z3" / "hf", out / "hf") < TOL
    step8 = tmp_path / "z3" / "checkpoints" / "step_0000008"
    proc, resumed = run_script(4, tmp_path / "same", cache, "--tp_size", "2", "--resume_from_checkpoint", step8,
                               "--skip_export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "universal" not in proc.stdout and resumed["args"]["zero_stage"] == 3
    assert_same_losses_after(resumed, zero3, 8)
    proc, moved = run_script(4, tmp_path / "tp4", cache, "--tp_size", "4", "--dp_size", "1", "--batch_size", "2",
                             "--resume_from_checkpoint", step8, "--skip_export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at tp 4 x dp 1 (ZeRO-3) through a universal checkpoint" in proc.stdout
    assert_same_losses_after(moved, zero3, 8, TOL)
    proc, _ = run_script(4, tmp_path / "z2", cache, "--tp_size", "2", "--resume_from_checkpoint", step8,
                         "--zero_stage", "2")
    assert "written with ZeRO-3, this run has ZeRO-2: DeepSpeed's universal checkpoints do not carry over" in (
        error_line(proc))


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path, cache, uninterrupted):
    _, reference = uninterrupted
    proc = launch(tmp_path, cache, *RUN[:-2], "--save_interval", "0")
    wait_for(proc, lambda: "step     2 |" in printed(tmp_path), "step 2")
    for pid in workers_of(proc.pid):
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, printed(tmp_path)[-3000:]
    output = printed(tmp_path)
    stopped = json.loads((tmp_path / "results.json").read_text())
    step = stopped["train"][-1]["step"]
    assert stopped["stopped_by"] == "SIGTERM" and f"stopped after step {step}" in output
    assert pointer(tmp_path) == f"step_{step:07d}" and step < 14 and stopped["export_dir"] is None

    proc, resumed = run_script(4, tmp_path, cache, *RUN[:-2], "--save_interval", "0",
                               "--resume_from_checkpoint", tmp_path / "checkpoints")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses_after(resumed, reference, step)


def test_export_reloads_in_plain_transformers_with_the_sharded_logits(tmp_path):
    sharded = tmp_path / "sharded_logits.pt"
    proc = torchrun(2, ROOT / "tests" / "export_worker.py", tmp_path / "hf", sharded)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, ROOT / "tests" / "plain_worker.py", "saved", sharded, tmp_path / "hf"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.split()[-1])
    assert diff < TOL, f"reloaded logits differ from the sharded model's by {diff:.2e}"


@pytest.mark.parametrize("nproc,tp", [(1, 1), (2, 1), (3, 1), (4, 4)])
def test_exported_model_evaluates_like_the_training_run(tmp_path, cache, uninterrupted, nproc, tp):
    """One model (the export), one held-out set, evaluated at dp = 1, 2, 3 and at tp=4: each block counts once
    whatever the number of DP ranks, so every layout gives the training run's (tp=2, dp=2) last eval loss."""
    out, reference = uninterrupted
    assert reference["export_dir"] == str(out / "hf")
    blocks = reference["eval"][-1]["blocks"]
    assert blocks % 2 and blocks % 3, f"{blocks} held-out blocks: pick a --seq_length that 2 and 3 do not divide"
    proc, evaluated = run_script(nproc, tmp_path, cache, "--model_name", out / "hf", "--tp_size", tp,
                                 "--precision", "fp32", "--seq_length", "60", "--num_steps", "0", "--verify_tp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert evaluated["eval"][0]["blocks"] == blocks
    assert abs(evaluated["eval"][0]["loss"] - reference["eval"][-1]["loss"]) < EXACT
    assert evaluated["verify_tp"]["worst_relative_diff"] < 1e-4  # a trained model, sharded again at this tp


def test_a_topology_change_to_zero0_is_refused(tmp_path, cache, uninterrupted):
    """The launched form of the checks that tests/test_units.py makes one by one."""
    out, _ = uninterrupted
    proc, _ = run_script(4, tmp_path, cache, *RUN[4:], "--tp_size", "4", "--dp_size", "1", "--zero_stage", "0",
                         "--resume_from_checkpoint", out / "checkpoints")
    assert "needs ZeRO-1 or 2 on both sides; resume with --tp_size 2 --dp_size 2 --zero_stage 2" in error_line(proc)
    assert "AutoTP partition" not in proc.stdout and not (tmp_path / "results.json").exists()


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache):
    proc, _ = run_script(2, tmp_path, cache, "--tp_size", "2", "--precision", "fp32", "--seq_length", "60",
                         "--num_steps", "10", "--learning_rate", "1e30", "--save_interval", "1", "--log_interval", "5")
    line = error_line(proc)
    assert "the loss or gradient norm is not finite at step" in line and "exitcode  : 3" in proc.stderr
    bad_step = int(line.split("at step ")[1].split(":")[0])
    assert 1 < bad_step <= 10
    assert pointer(tmp_path) == f"step_{bad_step - 1:07d}"
    meta = json.loads((tmp_path / "checkpoints" / pointer(tmp_path) / "run.json").read_text())
    assert meta["step"] == bad_step - 1 and not (tmp_path / "results.json").exists()
    assert not list((tmp_path / "checkpoints").glob(f"step_{bad_step:07d}*"))


@pytest.mark.parametrize("accelerations", [["--tp_overlap_comm"], ["--deepcompile"]])
def test_tp_accelerations_resume_exactly_and_export_the_trained_model(tmp_path, cache, accelerations):
    """The overlapped backward all-reduce (with the default vocab-parallel head; RUN above covers that head
    alone) and DeepCompile's autotp pass: a run resumed from its step-2 checkpoint gives the same later losses,
    and its export, evaluated by the script at tp=1 without DeepSpeed's TP layers, gives its last eval loss."""
    run = ["--tp_size", "2", "--precision", "fp32", "--seq_length", "60", "--num_steps", "4", "--log_interval", "1",
           "--eval_interval", "4", "--learning_rate", "3e-3", "--keep_last", "0", *accelerations]
    proc, full = run_script(2, tmp_path / "full", cache, *run, "--save_interval", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, resumed = run_script(2, tmp_path / "resumed", cache, *run, "--skip_export",
                               "--resume_from_checkpoint", tmp_path / "full" / "checkpoints" / "step_0000002")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses_after(resumed, full, 2)
    proc, evaluated = run_script(1, tmp_path / "eval", cache, "--model_name", tmp_path / "full" / "hf", "--tp_size", "1",
                                 "--precision", "fp32", "--seq_length", "60", "--num_steps", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert abs(evaluated["eval"][0]["loss"] - full["eval"][-1]["loss"]) < EXACT
