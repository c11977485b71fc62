"""A DeepSpeed config of the user's own (--deepspeed_config) and DeepSpeed's monitors (--report_to), on CPU.

  * settings the script does not set reach the engine (its config, and what it does with it: DeepSpeed's
    own step log); the CSV monitor's files hold the losses of results.json;
  * a setting that contradicts one of the script's flags, invalid JSON, something that is not a DeepSpeed
    config, a misspelt section, a value DeepSpeed rejects, a monitor whose package is missing: each one
    `error:` line naming what to change, before any weight loads; a resume compares the settings.

Run: python -m pytest tests/test_deepspeed_config.py -q   (about half a minute on 2 cores)
"""
import csv
import json

import pytest

import autotp_custom_patterns as S
from conftest import run_script, error_line


def test_a_config_of_ones_own_reaches_the_engine_and_the_csv_monitor(tmp_path, cache):
    (tmp_path / "ds.json").write_text(json.dumps({"steps_per_print": 2, "log_level": "info",  # DeepSpeed's step log
                                                  "zero_optimization": {"reduce_bucket_size": 5e7},
                                                  "gradient_clipping": 1.0}))  # the flag's value: fine
    proc, results = run_script(2, tmp_path / "out", cache, "--tp_size", "2", "--precision", "fp32", "--seq_length", "64",
                               "--num_steps", "4", "--log_interval", "1", "--eval_interval", "2", "--skip_export",
                               "--deepspeed_config", tmp_path / "ds.json", "--report_to", "csv_monitor")
    assert proc.returncode == 0, proc.stderr[-3000:]
    engine_config = results["deepspeed_config"]  # what deepspeed.initialize received
    assert engine_config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 5e7}
    assert engine_config["csv_monitor"]["enabled"] and engine_config["steps_per_print"] == 2
    assert "step=2, skipped=0" in proc.stdout + proc.stderr and "step=4, skipped=0" in proc.stdout + proc.stderr

    def column(name):
        with open(tmp_path / "out" / "monitor" / "train" / f"{name}.csv") as f:
            return [(int(row["step"]), float(row[name.split("_", 1)[1]])) for row in csv.DictReader(f)]

    assert column("train_loss") == [(r["step"], r["loss"]) for r in results["train"]]
    assert column("train_lr") == [(r["step"], r["lr"]) for r in results["train"]]
    assert column("eval_loss") == [(e["step"], e["loss"]) for e in results["eval"]]
    assert column("eval_perplexity") == [(e["step"], e["perplexity"]) for e in results["eval"]]


@pytest.mark.parametrize("extra,message", [
    ('{"zero_optimization": {"stage": 1}}', "sets zero_optimization.stage to 1, the script's flags to 2: set it "
                                            "with --zero_stage instead"),
    (None, "the wandb monitor needs the wandb package: pip install wandb"),
])
def test_a_contradiction_or_a_missing_monitor_package_stops_before_the_model_loads(tmp_path, cache, extra, message):
    (tmp_path / "ds.json").write_text(extra or "{}")
    flags = ["--deepspeed_config", tmp_path / "ds.json"] if extra else ["--report_to", "wandb"]
    proc, _ = run_script(2, tmp_path, cache, "--tp_size", "2", *flags)
    assert message in error_line(proc)
    assert "AutoTP partition" not in proc.stdout and "tokenize" not in proc.stderr


def config_for(tmp_path, content, *argv):
    (tmp_path / "ds.json").write_text(content)
    args = S.parse_args(["--deepspeed_config", str(tmp_path / "ds.json"), "--output_dir", str(tmp_path), *argv])
    S.derive_args(args, S.resolve_layout(0, 4, tp=2))
    return S.merge_user_config(args, S.build_ds_config(args, {"partition_config": S.builtin_partition_config()}),
                               S.user_ds_config(args))


@pytest.mark.parametrize("content,message", [
    ('{"gradient_clipping": 0.5}', "sets gradient_clipping to 0.5, the script's flags to 1.0: set it with --max_grad_norm"),
    ('{"train_micro_batch_size_per_gpu": 4}', "to 4, the script's flags to 1: set it with --batch_size"),
    ('{"train_batch_size": 3}', "sets train_batch_size to 3, the script's flags to 2: set it with --batch_size, "),
    ('{"bf16": {"enabled": false}}', "sets bf16.enabled to false, the script's flags to true: set it with --precision"),
    ('{"tensor_parallel": {"autotp_size": 4}}', "sets tensor_parallel.autotp_size to 4, the script's flags to 2"),
    ('{"tensor_parallel": {"preset_model": "llama"}}', "tensor_parallel.preset_model to \"llama\", the script's flags "
                                                       "to nothing: set it with --tp_size, --partition_config"),
    ('{"compile": {"deepcompile": true}}', "sets compile to {\"deepcompile\": true}, the script's flags to nothing"),
    ('{"zero_optimization": {"stage": 2,', "is not valid JSON"),
    ('[{"zero_optimization": {}}]', "is not a DeepSpeed config (a JSON object of its sections"),
    ('{"zero_optimisation": {"stage": 2}}', "DeepSpeed does not read ['zero_optimisation'] (misspelt?"),
    ('{"zero_optimization": {"reduce_bucket_sise": 5}}', "DeepSpeed rejects the resulting config: .*reduce_bucket_sise "
                                                         "Extra inputs are not permitted"),
])
def test_each_problem_with_a_config_of_ones_own_is_one_line(tmp_path, content, message):
    with pytest.raises(S.UsageError, match=message.replace("[", r"\[").replace("{", r"\{").replace("(", r"\(")):
        S.check_ds_config(config_for(tmp_path, content), "--deepspeed_config ds.json")


def test_the_same_values_merge_and_the_others_win(tmp_path):
    config = config_for(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": 1, "train_batch_size": 2,
                                              "tensor_parallel": {"autotp_size": 2}, "bf16": {"check_grad_overflow": True},
                                              "zero_optimization": {"stage": 2, "overlap_comm": True}}),
                        "--report_to", "csv_monitor")
    S.check_ds_config(config, "ds.json")
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": True}  # the user's own choice
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert config["csv_monitor"] == {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "train"}
    assert config["tensor_parallel"]["vocab_parallel_lm_head"] is True  # the script's section, kept whole


def test_a_resume_compares_the_settings_but_not_the_monitors(tmp_path):
    args = S.parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    args.user_deepspeed_config = {"zero_optimization": {"overlap_comm": True}, "csv_monitor": {"enabled": True}}
    (tmp_path / "checkpoints" / "step_0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000004" / "run.json").write_text(json.dumps(
        {"step": 4, "samples_consumed": 4, "args": vars(args)}))
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004")
    args.user_deepspeed_config = {"zero_optimization": {"overlap_comm": True}}  # no monitor now: fine
    assert S.find_checkpoint(args)[1]["step"] == 4
    args.user_deepspeed_config = {}
    with pytest.raises(S.UsageError, match="written with the --deepspeed_config settings .*overlap_comm.* this run "
                                           "has {}: use the same"):
        S.find_checkpoint(args)
