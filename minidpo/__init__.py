"""minidpo: Direct Preference Optimization from scratch in plain PyTorch."""
from minidpo.model import KVCache, Mistral, MistralConfig
from minidpo.checkpoint import load_model, save_model
from minidpo.tokenizer import Tokenizer, load_tokenizer
from minidpo.logprobs import sequence_logprobs, sequence_logprobs_from_hidden
from minidpo.loss import DPOOutput, dpo_loss
from minidpo.data import load_pairs, subset, tokenize_pairs, collate
from minidpo.lora import apply_lora, count_trainable, load_lora, lora_disabled, merge_lora, save_lora
from minidpo.quant import NF4Linear, NF4Weight, quantize_nf4
from minidpo.train import TrainConfig, train  # note: `minidpo.train` is this function; the module is sys.modules["minidpo.train"]

__version__ = "0.1.0"
