"""Evaluating and sampling trained models from the command line (docs/long_context.md).

Modules, one job each:
    loading   a weights folder or checkpoint root, and what it was trained on (tokenizer, document options)
    lm        loss, bits, perplexity and loss by position over a store split (`reformer-eval`)
    tasks     exact scoring of the synthetic tasks of data/synthetic.py (`reformer-eval --task`)
    report    tables, the JSON result, PNG plots (loss by position overlaid, task heat map)
    generate  cached generation of a prompt, decoded and made safe to print (`reformer-generate`)

Every forward is the trainer's evaluation forward, ``training.evaluation.score_batch``.
"""
