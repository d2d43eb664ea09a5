"""Two CPU processes (gloo DDP): both ranks end with identical weights, teacher and DINO centre included.

Under ``make test`` (torch on one thread) the two ranks are forked from the test process (Lightning's
``ddp_fork``: the same gloo DDP, without two new interpreters importing torch + MONAI); elsewhere the script runs
in a new interpreter that starts its second rank as Lightning's ``ddp`` does."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from .conftest import REPO, fork_is_safe
from .pretrain_helpers import data_2d

pytestmark = pytest.mark.slow  # two-process DDP: `make test` runs it, `make test-fast` leaves it out

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning as L
    from safetensors.torch import save_file
    from medfm.pretrain import run_pretrain
    from tests.pretrain_helpers import tiny_recipe


    class Dump(L.Callback):
        def __init__(self, out):
            self.out = out

        def _dump(self, trainer, pl_module, tag):
            state = {k: v.detach().contiguous() for k, v in pl_module.state_dict().items()}
            save_file(state, f"{self.out}/{tag}{trainer.global_rank}.safetensors")

        def on_train_start(self, trainer, pl_module):
            assert trainer.world_size == 2, trainer.world_size
            self._dump(trainer, pl_module, "start")

        def on_train_end(self, trainer, pl_module):
            self._dump(trainer, pl_module, "rank")


    def ddp_run(method, data, out, strategy="ddp"):
        cfg = tiny_recipe(method, trainer={"max_steps": 4, "devices": 2, "accelerator": "cpu", "strategy": strategy},
                          data={"batch_size": 4})
        run_pretrain(cfg, f"{out}/run", data_path=data, callbacks=[Dump(out)])


    if __name__ == "__main__":
        ddp_run(*sys.argv[1:4])
    """
)


@pytest.mark.parametrize("recipe", ["mae_vit_2d", "dino_vit_2d"])
def test_ddp_two_processes_hold_identical_weights(recipe, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    if fork_is_safe():
        space: dict = {"__name__": "ddp_run"}
        exec(compile(SCRIPT, str(script), "exec"), space)
        space["ddp_run"](recipe, data_2d(tmp_path), str(tmp_path), strategy="ddp_fork")
    else:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, str(script), recipe, data_2d(tmp_path), str(tmp_path)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert (r0[k] == r1[k]).all(), f"{k} differs between ranks"
    # and training moved the weights away from the initial ones
    start = load_file(tmp_path / "start0.safetensors")
    moved = [k for k in r0 if r0[k].is_floating_point() and not (r0[k] == start[k]).all()]
    assert any(k.endswith("patch_embed.proj.weight") for k in moved)
    assert (tmp_path / "run" / "encoder" / "model.safetensors").exists()
