"""How the library reports to the user (reformer_dist/console.py) and what a run writes into its folder before
training (training/run_dir.py)."""

from __future__ import annotations

import json
import logging
import sys

from tqdm import tqdm

from reformer_dist import console as console_module, ondisk
from reformer_dist.training.config import load_run_config
from reformer_dist.training.run_dir import prepare_run_dir


def test_messages_read_prog_kind_text_and_info_only_where_asked(capsys, console):
    log = logging.getLogger("reformer_dist.training.some_module")
    log.info("resumed from x at step 3")
    log.warning("data.path: no such folder")
    log.error("bad config")
    assert capsys.readouterr().err.splitlines() == [
        "reformer-train: resumed from x at step 3",
        "reformer-train: warning: data.path: no such folder",
        "reformer-train: error: bad config",
    ]
    console_module.setup("reformer-train", show_info=False)  # ranks other than 0: warnings and errors only
    log.info("not shown")
    log.warning("shown")
    assert capsys.readouterr().err.splitlines() == ["reformer-train: warning: shown"]
    assert console_module.prog_name() == "reformer-train"
    assert len(logging.getLogger(console_module.ROOT).handlers) == 1  # setup twice: one handler


def test_a_message_during_a_progress_bar_gets_its_own_line(capsys, console):
    bar = tqdm(total=10, file=sys.stderr, mininterval=0, ascii=True)
    bar.update(3)
    logging.getLogger("reformer_dist.x").info("eval step 3: loss 1.0")
    bar.close()
    err = capsys.readouterr().err
    assert "\nreformer-train: eval step 3: loss 1.0\n" in err.replace("\r", "\n")


def test_prepare_run_dir_writes_the_resolved_configs_and_moves_an_earlier_run_aside(tmp_path):
    cfg = load_run_config(None, [f"output.dir={tmp_path / 'run'}", "train.max_steps=7"])
    prepare_run_dir(cfg, {"train_batch_size": 4}, fresh=True)
    run = tmp_path / "run"
    assert "max_steps = 7" in (run / ondisk.RUN_CONFIG_TOML).read_text()
    assert json.loads((run / ondisk.DEEPSPEED_CONFIG).read_text()) == {"train_batch_size": 4}
    (run / ondisk.METRICS).write_text("{}\n")
    (run / ondisk.CHECKPOINTS_DIR / "step_00000003").mkdir(parents=True)

    prepare_run_dir(cfg, {"train_batch_size": 8}, fresh=False)  # a resume keeps the run's files
    assert (run / ondisk.METRICS).is_file() and not list(run.glob(ondisk.REPLACED_PREFIX + "*"))

    prepare_run_dir(cfg, {"train_batch_size": 8}, fresh=True)  # a fresh start moves them aside, never deletes
    (aside,) = run.glob(ondisk.REPLACED_PREFIX + "*")
    assert (aside / ondisk.METRICS).read_text() == "{}\n"
    assert (aside / ondisk.CHECKPOINTS_DIR / "step_00000003").is_dir()
    assert not (run / ondisk.METRICS).exists() and (run / ondisk.RUN_CONFIG_TOML).is_file()
