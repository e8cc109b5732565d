"""The per-crop parameter vector: every random choice of one augmented crop as 17 float32 numbers, the
layout shared by the DALI graph (its per-sample argument), the batched tensor augmentations of the FFCV
loader (pipelines/augment.py) and the fused CPU kernel (pipelines/cpu_augment.py)."""

P_ROI = slice(0, 4)  # y0, x0, y1, x1 relative to the decoded image (DALI only)
P_JITTER = 4  # 1.0 when the colour jitter is applied
P_FACTORS = slice(5, 9)  # brightness, contrast, saturation factors, hue shift (fraction of a full turn)
P_ORDER = slice(9, 13)  # the 4 operation ids (0 b, 1 c, 2 s, 3 h) in application order
P_GRAY, P_BLUR, P_SIGMA, P_FLIP = 13, 14, 15, 16
NUM_PARAMS = 17
