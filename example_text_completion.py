"""Complete a few text prompts with a Llama model (the built-in demo model when no checkpoint is given).

    python example_text_completion.py
    torchrun --nproc_per_node 1 example_text_completion.py llama-2-7b/ tokenizer.model
"""

from typing import Optional

from llama.cli import build_generator
from llama.commandline import fire_checked
from llama.distributed import collective, is_main_process


@collective("a collective between the ranks (the model-parallel all-reduce)")
def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,
    timeout_s: Optional[float] = None,
    quantize: Optional[str] = None,
) -> None:
    """Generate continuations of the example prompts below and print them.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth; omit both paths for the demo model.
        tokenizer_path: the tokenizer.model of the checkpoint.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling threshold.
        max_seq_len: longest prompt plus generation.
        max_gen_len: most tokens generated per prompt.
        max_batch_size: most prompts per batch.
        device: "cpu", "cuda" or "cuda:N"; defaults to cuda:LOCAL_RANK when CUDA is available.
        dtype: "float32", "float16" or "bfloat16"; defaults to float16 on CUDA and bfloat16 on CPU.
        compile: decode on the opt-in fast path (static shapes, torch.compile); same tokens, faster.
        timeout_s: seconds a rank waits for the others in a collective before the job fails naming them
            (default 300, see llama.distributed.DEFAULT_TIMEOUT_S); waiting for your next chat line is not limited.
        quantize: "int8" or "int4": weight-only quantization of the linear layers while loading (see
            llama/quant/); a checkpoint written by `python -m llama.quantize` needs no flag.
    """
    generator = build_generator(
        ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, compile, timeout_s, quantize
    )

    prompts = [
        # Open-ended: the model picks the direction.
        "The best advice I ever received was",
        # An explanation that starts mid-sentence.
        "In simple terms, a black hole is a place where",
        # Few-shot: the pattern tells the model what to do next.
        """Antonyms:
hot => cold
tall => short
early => late
bright =>""",
        # A short note with a clear purpose.
        """Dear neighbours,

We are writing to invite you to""",
    ]
    for start in range(0, len(prompts), max_batch_size):
        batch = prompts[start : start + max_batch_size]
        results = generator.text_completion(batch, max_gen_len=max_gen_len, temperature=temperature, top_p=top_p)
        if is_main_process():
            for prompt, result in zip(batch, results):
                print(prompt)
                print(f"> {result['generation']}")
                print("\n==================================\n")


if __name__ == "__main__":
    fire_checked(main)
