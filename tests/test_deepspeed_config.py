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
from conftest import error_line, preflight, run_script


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
    ('{"gradient_clipping": 0.5}', "sets gradient_clipping to 0.5, the script's flags to 1.0: set it with "
                                   "--max_grad_norm instead"),
    (None, "the wandb monitor needs the wandb package: pip install wandb"),
])
def test_a_contradiction_or_a_missing_monitor_package_stops_before_the_model_loads(tmp_path, cache, extra, message):
    (tmp_path / "ds.json").write_text(extra or "{}")
    flags = ["--deepspeed_config", tmp_path / "ds.json"] if extra else ["--report_to", "wandb"]
    proc, _ = run_script(2, tmp_path, cache, "--tp_size", "2", *flags)
    assert message in error_line(proc)
    assert "AutoTP partition" not in proc.stdout and "tokenize" not in proc.stderr


def config_for(tmp_path, content, *argv):
    """The merged config preflight makes (and checks) at tp 2 x dp 2."""
    (tmp_path / "ds.json").write_text(content)
    return preflight("--deepspeed_config", tmp_path / "ds.json", "--output_dir", tmp_path, "--tp_size", "2", *argv,
                     world=4).ds_config


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


def test_a_config_of_ones_own_may_choose_zero_3_and_offload_the_optimizer(tmp_path):
    """Its stage is the default of --zero_stage, and its offload_optimizer turns --offload_optimizer on (the
    optimizer factory then builds DeepSpeed's CPU Adam); a --zero_stage that contradicts it is refused."""
    config = '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": false}}}'
    run = preflight("--tp_size", "2", "--deepspeed_config", write(tmp_path, config), world=4)
    assert (run.args.zero_stage, run.args.offload_optimizer) == (3, True)
    assert run.ds_config["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                                  "offload_optimizer": {"device": "cpu", "pin_memory": False}}
    assert S.offloads_optimizer(run.ds_config)
    with pytest.raises(S.UsageError, match="sets zero_optimization.stage to 3, the script's flags to 2"):
        preflight("--tp_size", "2", "--zero_stage", "2", "--deepspeed_config", write(tmp_path, config), world=4)
    with pytest.raises(S.UsageError, match="needs ZeRO: use --zero_stage 1, 2 or 3"):
        preflight("--offload_optimizer", "--zero_stage", "0", world=1)


def write(tmp_path, content):
    (tmp_path / "ds.json").write_text(content)
    return tmp_path / "ds.json"


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
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"overlap_comm": true}}')
    args = preflight("--output_dir", tmp_path, "--deepspeed_config", tmp_path / "ds.json", "--report_to", "csv_monitor",
                     "--tp_size", "2", world=2).args
    (tmp_path / "checkpoints" / "step_0000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000004" / "run.json").write_text(json.dumps(
        {"step": 4, "samples_consumed": 4, "args": vars(args)}))
    (tmp_path / "checkpoints" / "latest").write_text("step_0000004")
    resume = ["--output_dir", tmp_path, "--tp_size", "2", "--resume_from_checkpoint", "latest"]
    assert preflight(*resume, world=2).resume.meta["step"] == 4  # its --deepspeed_config taken, no monitor now: fine
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(S.UsageError, match="written with the --deepspeed_config settings .*overlap_comm.* this run "
                                           "has {}: use the same"):
        preflight(*resume, "--deepspeed_config", tmp_path / "other.json", world=2)
