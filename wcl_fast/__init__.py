"""wcl-fast: a fast, faithful trainer for Weakly Supervised Contrastive Learning (Zheng et al., ICCV 2021)."""
__version__ = "0.1.0"
