"""Training RWKV models from scratch: data, loss, and (later) the recipe and the loop.

Modules (import them directly; this package imports nothing heavy on its own):

``rwkvkit.train.data``
    Token files (our ``NAME.tokens`` + ``NAME.json`` and Megatron/RWKV-LM ``.bin`` +
    ``.idx``), ``prepare`` (text / JSON Lines -> token files with a validation split) and
    the training sampler (the official "magic prime" order; resumable, data-parallel).
``rwkvkit.train.loss``
    ``chunked_cross_entropy`` (the loss from hidden states without all the logits) and
    ``evaluate_loss`` (exact perplexity of a token stream, carrying the recurrent state).
``rwkvkit.train.commands``
    The ``rwkvkit prepare`` and ``rwkvkit eval-ppl`` subcommands.
"""
