"""Privacy (layer 4): what recovered images and models reveal of owners' data; DP-SGD.

It inverts teachers with `inversion`, so it sits beside the engine, below it.

- `metrics`: ROC AUC, TPR at a low FPR, bootstrap and mean confidence intervals;
- `images`: pixel, feature and SSIM distances between two sets of images;
- `audit`: the leakage audit of one teacher (recovered images vs its training images);
- `membership`: the loss attack (Yeom et al. 2018) on a model and on a release;
- `dp`: training with DP-SGD through Opacus (the optional ``privacy`` extra).
"""
