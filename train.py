"""Train with the InstructGPT recipe.

python train.py                         # the whole recipe on the embedded default
python train.py stage=sft data.demonstrations=my_demos.jsonl model.name_or_path=gpt2
python train.py stage=ppo ppo.ptx.enabled=true
python train.py -m experiment=kl_sweep  # a sweep (Hydra multirun)
python train.py trainer=gpu strategy=ddp trainer.devices=8   # one node, 8 GPUs
"""

import os

import hydra
from omegaconf import DictConfig

# Outputs (data, exports, logs) go under LIT_RLHF_HOME; default: this repository's folder.
os.environ.setdefault("LIT_RLHF_HOME", os.path.dirname(os.path.abspath(__file__)))

from lit_rlhf.run import main as run_main  # noqa: E402  (after LIT_RLHF_HOME is set)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; all work happens in :func:`lit_rlhf.run.main`.

    Returns the run's ``optimized_metric`` (when set), the objective of Optuna searches.
    """
    return run_main(cfg)


if __name__ == "__main__":
    main()
