"""Model parallelism under torchrun on CPU (gloo): sharded checkpoints give the same results as one process."""

import pytest
import torch
from helpers import MP_PROMPTS, run_worker
from torch.testing import assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def single_process(make_checkpoint, tokenizer_path, build_generator):
    g = build_generator(make_checkpoint("gqa"), tokenizer_path)
    tokens = torch.tensor([g.tokenizer.encode(MP_PROMPTS[0], bos=True, eos=False)])
    return {
        "generations": [r["generation"] for r in g.text_completion(MP_PROMPTS, temperature=0, max_gen_len=12)],
        "logits": g.model.forward(tokens, 0),
    }


@pytest.mark.parametrize("n_shards", [2, 1], ids=["mp2-checkpoint", "mp1-checkpoint"])
def test_two_processes_match_one(make_checkpoint, tokenizer_path, single_process, n_shards):
    result = run_worker(2, make_checkpoint("gqa", n_shards=n_shards), tokenizer_path, MP_PROMPTS)
    assert result["generations"] == single_process["generations"]
    assert_close(torch.tensor(result["logits"]), single_process["logits"], rtol=1e-5, atol=1e-5)
