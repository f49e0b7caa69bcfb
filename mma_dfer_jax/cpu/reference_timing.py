"""The reference recipe's train step, timed in a subprocess step by step, interleaved with ours.

On a shared or noisy machine two benchmarks run one after the other can differ by tens of percent for reasons that
have nothing to do with either (other tenants, frequency, memory bandwidth). `bench --reference_python ...
--reference_tool ...` therefore alternates one step of ours with one step of the reference recipe, so that both see
the same conditions, and reports the ratio of the medians.

The reference side runs in its own interpreter (one that has torch; this package never imports it):
`../shared/tools/torch_mma_dfer.py`, an eager PyTorch MMA-DFER proven against the reference, driven by the small
script below: it builds the model, AdamW and a synthetic batch exactly as that tool's `time` command does, prints
`ready`, then runs one train step per `step` line on its stdin and prints the step's seconds.
"""
import subprocess

_DRIVER = r'''
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location('torch_mma_dfer', sys.argv[1])
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
torch, F = tool.torch, tool.F
width, depth, heads, img, batch, classes = map(int, sys.argv[2:8])
torch.manual_seed(0)
model = tool.MMADFER(width, depth, heads, img, classes, 1, 0.1).train()
opt = torch.optim.AdamW(model.trainable(), lr=1e-4, weight_decay=1e-2)
video = torch.rand(batch, 16, 3, img, img)
audio = torch.randn(batch, 1, 512, 128)
label = torch.randint(0, classes, (batch,))
print('ready', torch.__version__, torch.get_num_threads(), flush=True)
for line in sys.stdin:
  started = time.perf_counter()
  loss = F.cross_entropy(model(video, audio), label)
  opt.zero_grad()
  loss.backward()
  opt.step()
  print(time.perf_counter() - started, flush=True)
'''


class ReferenceStepper:
  """A running reference recipe; `step()` runs one of its train steps and returns its seconds."""

  def __init__(self, python: str, tool: str, model_config, batch_size: int):
    c = model_config
    if c.num_frames != 16 or c.temporal_layers != 1 or c.mlp_dim != 4 * c.width:
      raise ValueError('the reference timing tool builds 16 frames, one temporal layer and MLP 4 x width; '
                       f'this config has num_frames={c.num_frames}, temporal_layers={c.temporal_layers}, '
                       f'mlp_dim={c.mlp_dim}: time the reference with the paper-shaped configs only')
    args = [python, '-c', _DRIVER, tool] + [str(v) for v in (c.width, c.depth, c.num_heads, c.img_size,
                                                               batch_size, c.num_classes)]
    self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = self._proc.stdout.readline().split()
    if not ready or ready[0] != 'ready':
      self.close()
      raise RuntimeError(f'the reference recipe did not start: `{python} {tool}` (is torch installed there, '
                         'and timm?); its error is above')
    self.torch_version, self.threads = ready[1], int(ready[2])

  def step(self) -> float:
    self._proc.stdin.write('step\n')
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError('the reference recipe stopped during a step; its error is above')
    return float(line)

  def close(self):
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait(timeout=60)
