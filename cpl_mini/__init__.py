"""cpl_mini: 1-Lipschitz networks from a dynamical-system perspective.

Companion package of the book *1-Lipschitz Networks as Dynamical Systems*. The public API is flat, as
``torch.nn`` and ``torchdiffeq`` expose theirs::

    from cpl_mini import ConvexPotentialConv2d, cpl_network, certified_accuracy

The training loop is the one name that is not flat: ``cpl_mini.train`` is the module (also the command
line, ``python -m cpl_mini.train``), and ``cpl_mini.train.train(config)`` runs a training.

Every public name is listed in ``_API`` below with the module that defines it; names load lazily on first
use, so ``import cpl_mini`` is fast (it does not import torch). Submodules stay importable
(``cpl_mini.spectral``, ``cpl_mini.layers``, ...) for readers who want to see where a thing lives.
"""

import importlib

__version__ = "0.1.0"

#: public name -> module that defines it (one line each; sorted by module).
_API = {
    # utils: device, seeding, quick mode, the chapters' set-up
    "device": "utils",
    "seed_everything": "utils",
    "quick_mode": "utils",
    "setup": "utils",
    "REPO_URL": "utils",
    "colab_url": "utils",
    "glue": "utils",
    # spectral: norms of matrices and convolutions
    "power_iteration": "spectral",
    "OperatorNormModule": "spectral",
    "frozen_power_iteration": "spectral",
    "dense_spectral_norm": "spectral",
    "dense_spectral_norm_upper": "spectral",
    "conv_spectral_norm_fft": "spectral",
    "conv_spectral_norm_upper": "spectral",
    "conv_operator": "spectral",
    "gram_iteration_dense": "spectral",
    "gram_iteration_conv": "spectral",
    # precision: IEEE float32 for sound computations, float64 devices, input checks
    "ieee_precision": "precision",
    "float64_device": "precision",
    "check_last_dim": "precision",
    # layers: the Convex Potential Layer and the network pieces
    "ConvexPotentialLinear": "layers",
    "ConvexPotentialConv2d": "layers",
    "convex_potential_linear": "layers",
    "convex_potential_conv2d": "layers",
    "ChannelPad": "layers",
    "LipschitzAvgPool2d": "layers",
    "FirstCoordinates": "layers",
    "RowNormalizedLinear": "layers",
    "lipschitz_upper_bound": "bounds",
    # other 1-Lipschitz layers
    "skew": "orthogonal",
    "cayley": "orthogonal",
    "CayleyLinear": "orthogonal",
    "MatrixExpLinear": "orthogonal",
    "MaxMin": "orthogonal",
    "SpectralNormLinear": "normalized",
    "AOLLinear": "normalized",
    "aol_scaling": "normalized",
    "AOLConv2d": "normalized",
    "aol_conv_scaling": "normalized",
    "conv_gram_kernel": "normalized",
    "conv_gram_kernel_abs_upper": "normalized",
    "sll_t": "sll",
    "sll_residual": "sll",
    "SLLLinear": "sll",
    "sll_conv_t": "sll",
    "SLLConv2d": "sll",
    # downsampling: 1-Lipschitz changes of the image size and channels
    "InvertibleDownsampling": "downsampling",
    "ChannelSlice": "downsampling",
    # flows: vector fields, their flows and Euler steps
    "VectorField": "flows",
    "ConvexPotentialField": "flows",
    "SkewSymmetricField": "flows",
    "LinearField": "flows",
    "FunctionField": "flows",
    "SumField": "flows",
    "flow": "flows",
    "euler": "flows",
    "trajectory_distance": "flows",
    "one_sided_lipschitz": "flows",
    "euler_step": "flows",
    "euler_step_lipschitz_lower_bound": "flows",
    # lipschitz: empirical lower bounds
    "pair_ratio": "lipschitz",
    "random_pairs_lower_bound": "lipschitz",
    "jacobian_spectral_norm": "lipschitz",
    "exact_jacobian_norm": "lipschitz",
    "worst_pair_search": "lipschitz",
    # cifar: CIFAR-10/100 read safely from the official archives
    "CIFAR_CLASSES": "cifar",
    "CifarData": "cifar",
    "CorruptArchiveError": "cifar",
    "UnsafePickleError": "cifar",
    "ArchiveChecksumWarning": "cifar",
    "default_data_root": "cifar",
    "load_cifar": "cifar",
    "clear_cache": "cifar",
    # loader: the device-resident loader
    "DeviceLoader": "loader",
    "EpochPlan": "loader",
    "channel_stats": "loader",
    "cifar_loaders": "loader",
    # toy: toy 2-D sets
    "make_moons": "toy",
    "make_circles": "toy",
    "make_spirals": "toy",
    # models: the paper's networks
    "SIZES": "models",
    "parse_size": "models",
    "cpl_network": "models",
    "count_parameters": "models",
    "describe": "models",
    "use_channels_last": "models",
    # normalization: the input normalisation layer
    "InputNormalization": "normalization",
    # export: a plain torch.nn copy of a network (torch.export, TorchScript, ONNX)
    "to_plain": "export",
    "Residual": "export",
    "PlainChannelPad": "export",
    "PlainFirstCoordinates": "export",
    "PlainChannelSlice": "export",
    "PlainMaxMin": "export",
    # runs: configuration, checkpoints, records, trained models
    "TrainConfig": "runs",
    "book_config": "runs",
    "CheckpointError": "runs",
    "save_checkpoint": "runs",
    "load_checkpoint": "runs",
    "load_model_state": "runs",
    "load_run_model": "runs",
    # records: a run's results.json read back and summarised
    "read_results": "records",
    "upgrade_record": "records",
    "run_summary": "records",
    # custom: your own network in the training pipeline
    "own_network": "custom",
    "check_certifiable": "custom",
    "architecture": "custom",
    "import_factory": "custom",
    # train: the training loop
    "autocast_dtype": "fastpath",
    "cpu_info": "fastpath",
    "device_name": "fastpath",
    "make_train_step": "train",
    "compile_decision": "fastpath",
    "lr_at": "train",
    "margin_loss": "train",
    # certification
    "DEFAULT_EPS": "certify",
    "certified_radius": "certify",
    "certified_radius_pairwise": "certify",
    "certified_accuracy": "certify",
    "network_lipschitz": "certify",
    "format_table": "certify",
    "eps_label": "certify",
    "parse_eps": "certify",
    # attacks
    "margin": "attacks",
    "pgd_l2": "attacks",
    "minimal_adversarial_l2": "attacks",
    # plotting helpers of the chapters
    "decision_grid": "plotting",
    "plot_decision_boundary": "plotting",
    "plot_certified_balls": "plotting",
    "ball_prediction_changes": "plotting",
    "plot_vector_field": "plotting",
    "plot_transported_grid": "plotting",
    "plot_network_diagram": "plotting",
    # allocator
    "tune_cpu_allocator": "allocator",
}

__all__ = sorted(_API)


def __getattr__(name):
    module = _API.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError:
        raise AttributeError(f"module 'cpl_mini' has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_API))
