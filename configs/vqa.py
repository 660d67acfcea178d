"""FedDAT and its baselines on a VQA-style heterogeneous benchmark: the project's entry config.

Default (offline, any CPU, minutes): FedDAT on the synthetic Function benchmark with the mini ViLT (64 wide, 4
layers, patch 8) pretrained on synthetic captions and shipped in the package (feddat_jax/foundation/).
  python -m feddat_jax.main --config=configs/vqa.py
Variants in the argument string (big_vision style), any field with --config.<field>=...:
  python -m feddat_jax.main --config=configs/vqa.py:benchmark=function,algorithm=fedavg_adapter
  python -m feddat_jax.main --config=configs/vqa.py:runlocal=true          # a smoke run in seconds
  python -m feddat_jax.main --config=configs/vqa.py:size=base,backbone=hf:/ckpt/vilt-b32-mlm,data=/data/feddat
  python -m feddat_jax.main --config=configs/vqa.py:backbone=albef          # ALBEF (random, tiny) instead of ViLT
"""
import ml_collections

from feddat_jax import config_utils
from feddat_jax.models import backbones

BENCHMARKS = ("domain", "function", "scene", "task")
SIZES = ("tiny", "mini", "small", "base")


def get_config(arg=None):
  a = config_utils.parse_arg(arg, benchmark="function", algorithm="feddat", size="mini", data="synthetic",
                             backbone="pretrained", population="natural", runlocal=False, seed=0)
  config_utils.check_choice("benchmark", a["benchmark"], BENCHMARKS)
  config_utils.check_choice("size", a["size"], SIZES)
  backbones.parse(a["backbone"])  # a one-line error naming the choices

  c = ml_collections.ConfigDict()
  c.benchmark = a["benchmark"]  # heterogeneity type: domain | function | scene | task (docs/results.md)
  c.algorithm = a["algorithm"]  # "feddat", "<family>_<peft method>" (feddat_jax.federated.algorithms) or an
  #                               outside "module:function", e.g. examples.ditto:make (docs/algorithms.md)
  c.size = a["size"]  # ViLT preset (feddat_jax/models/vilt.py): mini (the default, shipped pretrained) | tiny (patch
  #                     16, the earlier default) | small | base (hf: carries its own)
  c.data = a["data"]  # "synthetic", or a manual directory holding the real datasets in their official formats
  c.backbone = a["backbone"]  # ViLT: pretrained (mini: the shipped weights; else pretrained here on synthetic
  #                             captions and cached; pretrained_tiny is its older name) | random | hf:<local
  #                             dir>; ALBEF: albef (random init) | albef:<local ALBEF.pth> (feddat_jax/models/albef.py)
  c.seed = a["seed"]  # training seed: initialisation, data order, cohort sampling, population partition

  c.rounds = 10  # communication rounds (the paper: 30)
  c.local_epochs = 1  # local epochs per round (the paper: 1)
  c.local_steps = 0  # > 0: a fixed number of local steps per round instead of epochs
  c.batch_size = 16  # per-client batch (the reference scripts: 2)
  c.population = a["population"]  # clients from the datasets: natural (one per dataset, the paper) | iid:N |
  #                                 dirichlet:N:ALPHA (N per dataset, label skew; feddat_jax/data/partition.py)
  c.cohort_size = 0  # clients per round, sampled without replacement; 0: all (the paper: all)
  c.aggregation = "uniform"  # uniform (the reference) | examples (FedAvg's n_k weights)
  c.eval_every = 2  # evaluate before the first round, every N rounds and after the last (the reference: 5)
  c.checkpoint_every = 5  # save server and client states every N rounds and after the last; 0: never
  c.max_local_steps = 0  # > 0: at most this many local steps per client and round (caps large clients' epochs)
  c.step_buckets = 1  # the round program's step counts: 1 (one compile; small clients' steps masked) or up to N
  #                     halvings of the largest (less padded work, one compile each; feddat_jax/federated/feeder.py)
  c.eval_clients = 0  # clients scored per evaluation (a reproducible sample); 0: all. The final one scores all
  c.client_parallelism = "auto"  # auto | vmap | scan | lanes: the cohort's clients batched (vmap), one after the
  #                                other (scan), or packed into `lanes` lanes that each run their clients back to
  #                                back (no masked steps for smaller clients; scan and lanes need a 1-device
  #                                clients axis). auto: lanes on a 1-device CPU (measured fastest), vmap otherwise
  c.lanes = 0  # client_parallelism=lanes: lanes per round (1: every client in one sequence); 0: chosen from the
  #             clients' steps and the model's size (engine.auto_lanes; BENCHMARKS.md, "How many lanes")

  # Faults and robustness (feddat_jax/federated/faults.py, aggregators.py).
  c.aggregator = "mean"  # server aggregation of shared parameters: mean | median | trimmed_mean | norm_bounded_mean
  #                        | dp_mean (see feddat_jax/federated/aggregators.py)
  c.trim_fraction = 0.1  # trimmed_mean: share of the weight cut at each end, per coordinate, in [0, 0.5)
  c.max_update_norm = 1.0  # norm_bounded_mean: L2 bound on each client's update (upload - server)
  c.dropout = 0.0  # probability that a cohort client does not report in a round (simulated), in [0, 1)
  c.min_clients = 1  # a round in which fewer clients report finite uploads is skipped (server unchanged)
  c.dp = ml_collections.ConfigDict()  # aggregator=dp_mean: client-level DP-FedAvg, (epsilon, delta) in results.json
  c.dp.clip_norm = 1.0  # L2 bound on each client's update; 0: no clipping (only with noise_multiplier 0)
  c.dp.noise_multiplier = 1.0  # std of the Gaussian noise on the sum of updates, in units of clip_norm
  c.dp.delta = 1e-5  # the delta of the reported (epsilon, delta)

  c.compute_dtype = "float32"  # float32 | bfloat16: matmuls and activations; parameters, optimiser state,
  #                              losses and aggregation stay float32 (bfloat16 pays on GPU/TPU, not on CPU)
  c.text_len = 40  # text tokens (ViLT's position embeddings)
  c.num_answers = 100  # answer-head width: the top-K answers per client (the reference: 100)
  c.head_readout = "cls"  # what the answer head reads per image: cls (ViLT's pooled [CLS], the reference) |
  #                         cls_image (also the mean of the image-patch outputs; feddat_jax/models/vlm.py)
  c.image_size = 0  # model input size; 0: the size preset's (tiny 64, small 128, base 384)
  c.patch_size = 0  # ViLT patch size; 0: the size preset's (tiny 16, small 16, base 32)
  c.image_preprocess = "square"  # square: every image fitted into image_size x image_size (the synthetic job) |
  #   vilt: ViltImageProcessor's resize (shorter side image_size, longer at most 1333/800 of it, both multiples
  #   of patch_size; 384/640/32 at base), padded with a pixel mask onto one canvas per run (docs/real_data.md)

  c.peft = ml_collections.ConfigDict()
  c.peft.reduction_factor = 16  # adapter bottleneck = hidden / reduction_factor
  c.peft.adapter_init = "normal"  # normal: N(0, 0.02) down and up (the reference) | zero_up
  c.peft.lora_rank = 16  # LoRA rank on query and value
  c.peft.lora_alpha = 16.0  # LoRA scale alpha / rank
  c.peft.prompt_length = 5  # prompt tokens per modality
  c.peft.prompt_generator = "mlp"  # mlp (the reference) | direct

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3  # AdamW learning rate (the reference: 1e-4 for ViLT-B/32; tiny models want more)
  c.optim.weight_decay = 0.01  # not on biases and LayerNorm scales
  c.optim.b1 = 0.9  # Adam beta1
  c.optim.b2 = 0.98  # Adam beta2 (the reference: 0.98)
  c.optim.eps = 1e-8  # Adam epsilon
  c.optim.schedule = "warmup_linear"  # warmup_linear | constant
  c.optim.warmup_frac = 0.1  # warm-up share of the schedule
  c.optim.restart_each_round = False  # the released code restarts the schedule every round (docs/released_code.md)
  c.optim.horizon_epochs = 15.0  # with restart_each_round: schedule length in local epochs (reference: 15)
  c.optim.keep_state = False  # keep Adam moments across rounds (the reference starts fresh)
  c.optim.head_lr_mult = 1.0  # the answer head's lr over the lr (ViLT finetunes heads at 10x; the reference: 1)

  c.options = ml_collections.ConfigDict()  # algorithm options; only those the algorithm reads are passed
  c.options.temperature = 3.0  # FedDAT: KD temperature
  c.options.freeze_personal_after_first_round = False  # FedDAT: the released code's A_C freeze (docs/released_code.md)
  c.options.eval_stale_frozen_copy = False  # FedDAT: evaluate the DAT with the stale Â_S (docs/released_code.md)
  c.options.zero_grad_adam_steps = False  # FedDAT: the released code's zero-gradient steps (docs/released_code.md)
  c.options.prox_mu = 0.01  # FedProx: proximal weight (examples/ditto.py: its lambda)
  c.options.server_lr = 0.0  # FedAvgM / FedAdam / FedYogi: server learning rate; 0: 1.0 for FedAvgM, 0.01 else

  c.albef = ml_collections.ConfigDict()  # only with backbone=albef[:...]: answers are generated, not classified
  c.albef.answer_len = 8  # tokens per candidate answer, "[CLS] answer [SEP]" padded (longer answers are cut)
  c.albef.answers_per_example = 4  # training: each example's top answers by soft score, weighted by it
  c.albef.rank_k = 64  # evaluation: candidates kept by first-token probability, then ranked by likelihood
  c.albef.tokenizer = ""  # real data: a local bert-base-uncased directory (ALBEF's WordPiece tokenizer)

  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.seed = 0  # the benchmark's draw (fixed across training seeds, so seeds vary training only)
  c.synthetic.scale = 1.0  # dataset size multiplier (1.0: a few hundred to ~2000 train examples per client)
  c.synthetic.image_size = 64  # rendered image size (resized to the model's)

  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.steps = 0  # 0: the size's default (feddat_jax.pretrain.DEFAULT_STEPS)
  c.pretrain.mask_prob = 0.0  # MLM masking rate of the caption tokens; 0: ViLT's 0.15
  c.pretrain.cache_dir = "~/.cache/feddat_jax/foundation"  # pretrained backbones, reused across runs

  c.tfds_dir = "~/.cache/feddat_jax/tfds"  # where datasets (synthetic and real) are prepared as array_record
  c.data_loading = "memory"  # memory: every client's examples preprocessed once into host RAM | stream: only
  #   example indices kept; each round's cohort read from the array_record files and preprocessed by grain's
  #   worker threads one round ahead (same batches; host RAM flat in the dataset's size; docs/real_data.md)
  c.stream_cache_mb = 1024  # data_loading=stream: preprocessed examples kept for later rounds (least recently
  #                            used dropped first; 0: none): host RAM bounded by this, not by the data

  # Scale-out (feddat_jax/federated/sharding.py; launchers in launch/). Not part of the run's fingerprint:
  # the same run may resume on another device count or number of processes.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.shard_clients = True  # with several devices: clients axis sharded over all (one device: no-op)
  c.distributed.data_parallel = 1  # devices per client on the mesh's data axis (reserved; 1 for now)
  c.distributed.coordinator_address = ""  # "host:port" of process 0 for jax.distributed; "": one process
  c.distributed.num_processes = 1  # processes in the job (with coordinator_address)
  c.distributed.process_id = 0  # this process's rank (with coordinator_address)
  c.distributed.auto_detect = False  # jax.distributed.initialize() reads the cluster (TPU pod slice, SLURM)
  c.distributed.cpu_collectives = "gloo"  # cross-process collectives of the CPU backend (local multi-process)

  if a["runlocal"]:  # a smoke run: tiny everything
    c.size = "tiny"
    c.rounds = 2
    c.local_steps = 2
    c.batch_size = 4
    c.eval_every = 1
    c.checkpoint_every = 1
    c.num_answers = 20
    c.synthetic.scale = 0.03
    c.pretrain.steps = 20
  return c
