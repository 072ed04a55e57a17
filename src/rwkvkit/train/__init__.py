"""Training RWKV models from scratch: data, loss, the official recipe and the loop.

Modules (import them directly; this package imports nothing heavy on its own):

``rwkvkit.train.data``
    Token files (our ``NAME.tokens`` + ``NAME.json`` and Megatron/RWKV-LM ``.bin`` +
    ``.idx``), ``prepare`` (text / JSON Lines -> token files with a validation split) and
    the training sampler (the official "magic prime" order; resumable, data-parallel).
``rwkvkit.train.loss``
    ``chunked_cross_entropy`` (the loss from hidden states without all the logits) and
    ``evaluate_loss`` (exact perplexity of a token stream, carrying the recurrent state).
``rwkvkit.train.config``
    ``TrainConfig``: every setting, presets (tiny, 0.1b, 0.4b), TOML loading and overrides.
``rwkvkit.train.recipe``
    The official parameter groups, AdamW settings and the warm-up + cosine schedule.
``rwkvkit.train.loop``
    ``train(config)``: accumulation, clipping, evaluation, metrics, plots, checkpoints.
``rwkvkit.train.checkpointing``
    Atomic checkpoint directories, keep-last-K, the ``latest`` pointer, exact resume,
    export to the official ``.pth`` layout.
``rwkvkit.train.distributed``
    torchrun set-up (NCCL on GPU, gloo on CPU), DDP and FSDP wrapping.
``rwkvkit.train.commands``
    The ``rwkvkit prepare``, ``eval-ppl``, ``train`` and ``export-pth`` subcommands.
"""
