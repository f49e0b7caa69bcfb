"""Settings shared by every experiment config: the paper's training recipe and the ViT-B model.

Each experiment file (dfew.py, mafw.py, demo.py) starts from `base_config()` and overrides what differs.
"""
import ml_collections


def model_config(num_classes: int) -> ml_collections.ConfigDict:
  """MMA-DFER at the paper's size: two ViT-B/16 encoders, one temporal layer."""
  m = ml_collections.ConfigDict()
  m.num_classes = num_classes
  # 'audio_video': the paper's model; 'video' (face ViT only) or 'audio' (AudioMAE only): a unimodal model without the
  # other encoder and without the fusion adapters (README.md, "Unimodal models"). Released checkpoints are audio_video.
  m.modalities = 'audio_video'
  m.img_size = 224               # face crops are img_size x img_size
  m.patch_size = 16
  m.num_frames = 16              # frames sampled per clip (one per segment)
  m.audio_frames = 512           # fbank rows (10 ms hops) after pad/cut
  m.audio_mels = 128             # fbank mel bins
  m.width = 768                  # ViT width D (both encoders)
  m.depth = 12                   # ViT blocks; a multiple of 6 (one prompt stage per 6 blocks)
  m.num_heads = 12
  m.mlp_dim = 3072
  m.prompts_per_stage = 3        # progressive prompts added every 6 blocks
  m.fusion_width = 128           # the adapters' bottleneck
  m.temporal_width = 512
  m.temporal_layers = 1
  m.temporal_heads = 8
  m.temporal_head_dim = 64
  m.temporal_mlp_dim = 1024
  m.drop_path_rate = 0.1         # stochastic depth in the frozen encoders (train only)
  m.dtype = 'float32'            # encoder compute dtype: 'float32' (CPU) or 'bfloat16' (GPU/TPU)
  # Rematerialisation of the lockstep layers: keep the outputs of the weight matmuls, recompute the rest (norms,
  # softmax, GELU, the attention score matmul) in the backward pass. Half the memory of keeping everything and, on
  # CPU, faster (less memory to fault in); BENCHMARKS.md. remat=False keeps every activation.
  m.remat = True
  m.remat_policy = 'dots_with_no_batch_dims_saveable'  # a name in jax.checkpoint_policies, or
                                 # 'dots_and_attention_probs' (also keeps the softmax: more memory, no recompute)
  m.scan_unroll = 1              # unroll factor of the scan over the lockstep layers
  m.attention_impl = ''          # '' = on CPU the fused kernel of cpu_kernels (float32) or einsum, elsewhere
                                 # jax.nn.dot_product_attention's choice; 'cpu_fused', 'einsum', 'xla' or 'cudnn'
  m.matmul_impl = ''             # the encoder blocks' and adapters' Dense matmuls: '' = OpenBLAS (cpu_kernels) on
                                 # one CPU device in float32, XLA elsewhere; 'xla' or 'openblas' to force one
  return m


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = 'dfew'             # 'dfew' | 'mafw' | 'synthetic'
  c.fold = 1                     # 1..5
  c.data_dir = 'datasets'        # where the TFDS builders wrote the ArrayRecord folds
  c.num_epochs = 25
  c.batch_size = 8               # global batch, over every device and process
  c.eval_batch_size = 8
  c.grad_accum_steps = 1         # micro-batches per optimizer step (same result as one large batch)
  c.learning_rate = 1e-4
  c.weight_decay = 1e-2
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.schedule = 'epoch_cosine'    # reference: CosineAnnealingLR(T_max=epochs) stepped per epoch
  c.warmup_steps = 0             # only for schedule='warmup_cosine' (per-step)
  c.label_smoothing = 0.0
  c.seed = 1

  c.model = model_config(num_classes=7)

  c.init = ml_collections.ConfigDict()
  c.init.face_checkpoint = ''    # MAE-Face mae_face_pretrain_vit_base.pth
  c.init.audio_checkpoint = ''   # AudioMAE pretrained.pth
  c.init.checkpoint = ''         # a converted or trained Flax checkpoint to start from

  c.input = ml_collections.ConfigDict()
  c.input.read_threads = 2       # Grain read threads per process
  c.input.worker_count = 0       # Grain worker processes (0: threads only)
  c.input.prefetch = 2           # batches prefetched ahead of the device
  c.input.augment = True
  c.input.synthetic_train_size = 256  # clips of the synthetic dataset (dataset='synthetic')
  c.input.synthetic_test_size = 64
  c.input.synthetic_frame_size = 48   # frames of synthetic clips are this many pixels square
  c.input.synthetic_colour_jitter = 0.0   # harder synthetic set: face hue spread toward the next class's (0..1)
  c.input.synthetic_silent_fraction = 0.0  # harder synthetic set: this fraction of clips without audio

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1               # devices on the 'data' axis (-1: all)

  # XLA:CPU only: glibc keeps freed memory for reuse, so each step's temporary buffer is not page-faulted in anew
  # (5-12% faster steps at batch 1), where the machine has room for it after the first step (two step buffers and a
  # third's margin), with a guard that hands memory back if the heap grows; mma_dfer_jax/host_memory.py, BENCHMARKS.md.
  c.cpu_keep_freed_memory = True

  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 10
  return c
