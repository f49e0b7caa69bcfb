"""Train, evaluate and cross-validate MMA-DFER from a checkout (installed: the `mma-dfer-train` command).

  python launch.py --config configs/mafw.py --workdir runs/mafw_fold1 [--config.fold=2 ...]
  python launch.py --config configs/mafw.py --workdir runs/mafw_cv --mode cross_validate
  python launch.py --config configs/mafw.py --workdir runs/eval --mode eval --config.init.checkpoint=converted/

See mma_dfer_jax/launch.py for the flags.
"""
from mma_dfer_jax import launch

if __name__ == '__main__':
  launch.run()
