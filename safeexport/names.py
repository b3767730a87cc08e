"""Every set of names safeexport offers, in one torch-free place.

The stage configs take their fields' choices from here (``opt(..., choices=...)``), the command
line its ``click.Choice`` lists and help texts from the configs, and each registry checks when
it is imported that its built-in entries are exactly its list here (``Registry.check``). So a
new format, attack, method, dataset or model is added to its registry and here, and a test
(tests/test_layout.py) fails when it is added in one place only.
"""

METHODS = ("safecompress", "dense", "prune", "pr-dp", "pr-advreg", "pr-dmp", "kd", "kd-dp",
           "kd-advreg", "kd-dmp", "mia-pr")
BASELINES = METHODS[1:]  # compressor.baselines registers one function under each
DATASETS = ("digits", "synthetic", "fashionmnist", "mnist", "cifar10", "cifar100",
            "tinyimagenet", "purchase100", "texas100", "purchase-like", "agnews", "yelp5")
DATASET_PREFIXES = ("npz:", "folder:", "torch:")  # a user's own data
MODELS = ("cnn", "mlp", "alexnet", "vgg16", "resnet18", "bert", "roberta")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "multistep")
AUGMENTS = ("auto", "crop-flip", "none")
REGULARIZERS = ("none", "re1", "re2")
PRUNE = ("magnitude", "threshold")
GROW = ("gradient", "random")
THRESHOLD_ATTACKS = ("loss", "confidence", "entropy", "modified_entropy")
ATTACKS = ("nasr", "class-relative", *THRESHOLD_ATTACKS)  # safeexport.attacks.ATTACKS
REFERENCE_ATTACKS = ("lira", "rmia")
SCORES = (*ATTACKS, "lira")  # SafeCompress's in-loop safety score
SELECTIONS = ("tm", "random")
REFERENCE_METHODS = ("same", "dense")
EXECUTORS = ("local", "ray")
FORMATS = ("onnx", "tflite")
BITS = (32, 16, 8, 4, 3, 2)
SCHEMES = ("weight-only", "dynamic", "static")
LEVELS = ("symmetric", "asymmetric")  # the integer levels of a quantized weight
HOST_RUNTIMES = ("torch", "onnxruntime", "tflite")  # safeexport.runtimes.RUNTIMES
RUNTIMES = ("auto", *HOST_RUNTIMES, "adb")  # `evaluate --runtime`; device_eval registers adb
RUNNERS = ("benchmark_model", "python")
