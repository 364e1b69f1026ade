"""minidpo: Direct Preference Optimization from scratch in plain PyTorch."""
from minidpo.model import KVCache, Mistral, MistralConfig
from minidpo.checkpoint import load_model, save_model
from minidpo.tokenizer import Tokenizer, load_tokenizer
from minidpo.loss import DPOOutput, dpo_loss
from minidpo.data import load_pairs, subset, tokenize_pairs, collate

__version__ = "0.1.0"
