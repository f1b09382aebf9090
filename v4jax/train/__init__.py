"""Training and fine-tuning DeepSeek-V4 (layer 9 of DESIGN.md: a consumer of the public API).

Modules: `optim` (Muon + AdamW, schedules), `data` (grain pipelines, packing), `model`
(trainable form, QAT), `losses` (LM, MTP, balance, indexer KL, `value_and_grad`).
"""
