"""tools/zero_to_safetensors.py on real ZeRO checkpoints, run where neither reformer_dist nor DeepSpeed
can be imported: the same tensors and model config as the package's `reformer-ckpt consolidate`.

The script runs in a subprocess with PYTHONPATH unset, its working folder outside the repository, the
repository off sys.path, and an import hook that makes `reformer_dist` and `deepspeed` unimportable (the
package is installed editable in the test venv, so leaving the repo is not enough); the subprocess checks
that neither was loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reformer_dist import ReformerConfig, ReformerLM
from reformer_dist.checkpoint.consolidate import consolidate
from reformer_dist.ondisk import CONFIG_NAME, WEIGHTS_NAME, ZERO_TO_SAFETENSORS
from tests.distributed.ckpt_runs import saved
from tests.distributed.train_launcher import REPO, clean_env, launch

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCRIPT = REPO / "tools" / ZERO_TO_SAFETENSORS

# Runs the script as __main__ with the two packages hidden, then proves they stayed unloaded.
_ISOLATED = """
import runpy, sys
HIDDEN = ("reformer_dist", "deepspeed")
REPO = sys.argv[1]

class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None

sys.meta_path.insert(0, Hide())
# the repository's own folders go; the interpreter's (a venv may live inside the repository: `make test`) stay
sys.path[:] = [p for p in sys.path if p and (not p.startswith(REPO) or p.startswith(sys.prefix))]
for name in HIDDEN:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the isolation failed")
script = sys.argv[2]
sys.argv = sys.argv[2:]
try:
    runpy.run_path(script, run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
    if loaded:
        raise SystemExit(f"loaded {loaded}")
"""


def run_isolated(script: Path, *args: Path | str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `script args` in a Python that has torch and safetensors but neither reformer_dist nor deepspeed."""
    env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}
    runner = cwd / "isolated.py"
    runner.write_text(_ISOLATED)
    assert not cwd.resolve().is_relative_to(REPO)
    return subprocess.run(
        [sys.executable, str(runner), str(REPO), str(script), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_same_as_consolidate(ckpt: Path, tool_out: Path, pkg_out: Path) -> dict[str, torch.Tensor]:
    """The script's folder holds the package's consolidated tensors (bit for bit) and model config."""
    consolidate(ckpt, pkg_out)
    ours, theirs = load_file(str(tool_out / WEIGHTS_NAME)), load_file(str(pkg_out / WEIGHTS_NAME))
    assert ours.keys() == theirs.keys()
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k
    assert ReformerConfig.load(tool_out / CONFIG_NAME) == ReformerConfig.load(pkg_out / CONFIG_NAME)
    model = ReformerLM.from_pretrained(tool_out)  # loads as it stands (no checksums.json: unverified)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in theirs.items())
    return ours


@pytest.mark.parametrize("stage, offload", [(2, False), (3, False), (1, True)])
def test_zero_to_safetensors_needs_only_torch_and_safetensors(tmp_path, stage, offload):
    run = saved(stage, offload)
    assert run.result(0)["stage"] == stage, run.output[-2000:]
    script = tmp_path / ZERO_TO_SAFETENSORS
    shutil.copyfile(SCRIPT, script)
    p = run_isolated(script, run.root, tmp_path / "tool", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tensors" in p.stdout and str(run.root / "global_step2") in p.stdout
    ours = assert_same_as_consolidate(run.root, tmp_path / "tool", tmp_path / "pkg")
    live = torch.load(run.out / "live_state.pt")
    assert all(torch.equal(ours[k], v) for k, v in live.items())

    p = run_isolated(script, run.root / "global_step2", tmp_path / "bf16", "--dtype", "bf16", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    bf16 = load_file(str(tmp_path / "bf16" / WEIGHTS_NAME))
    assert all(torch.equal(bf16[k], v.to(torch.bfloat16)) for k, v in ours.items())


def test_a_training_run_leaves_the_script_beside_its_checkpoints(tmp_path):
    out = tmp_path / "run"
    run = launch(
        1,
        out,
        ["train.max_steps=2", "checkpoint.at_end=true", f"deepspeed.config={REPO}/configs/deepspeed/zero3.json"],
        launcher="python",
    )
    root = out / "checkpoints"
    copy = root / ZERO_TO_SAFETENSORS
    assert copy.is_file(), run.output[-3000:]
    assert copy.read_bytes() == SCRIPT.read_bytes() and os.access(copy, os.X_OK)
    p = run_isolated(copy, root, tmp_path / "tool", cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same_as_consolidate(root, tmp_path / "tool", tmp_path / "pkg")
    assert (
        json.loads((tmp_path / "tool" / CONFIG_NAME).read_text())
        == json.loads((root / "step_00000002" / "run_config.json").read_text())["config"]["model"]
    )
