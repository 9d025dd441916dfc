"""NL-MM: the nested-learning multimodal model, trained from raw media (tasks/nlmm.py runs it).

    data.py       raw media -> in-memory tensors (images, log-mel, word tokens) and padded batches
    layers.py     blocks with fast-weight or softmax mixers, cross-attention, sin-cos positions
    model.py      encoders (+ TTT adapters) -> central latent memory (+ CMS levels) -> text / image / audio decoders
    core.py       the trainable core: network, EMA weights, the multi-term loss (global-batch means)
    optim.py      the NL optimizer (levels at their own periods, one torch optimizer) and EMA
    evaluate.py   retrieval, captions (token F1, BLEU, CIDEr), transcripts (F1, WER), spoken digits
    inference.py  a loaded run: caption / transcribe / embed / adapt
"""
