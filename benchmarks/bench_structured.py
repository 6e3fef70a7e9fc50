"""What constrained decoding costs: decode speed with and without a constraint, in one run.

Generates the same number of tokens from the same prompt with the shipped model
(or --model), unconstrained and under each constraint, alternating the runs so
that load from other processes falls on both alike, and reports the median
tokens/s of each, its ratio to the unconstrained runs, the time spent in the
constraint itself (mask + advance) per token, and that time as a share of an
unconstrained token's. The constraints are built so
that they never complete before --tokens: a JSON array of at least 10,000
strings, a regex of words up to a closing phrase, a regex of exactly 2,000 words
(a counted repetition, the costliest kind of regex for the engine), a Lark
grammar of 1,000 nested lists.

    python benchmarks/bench_structured.py
    python benchmarks/bench_structured.py --model rwkv7-0.4b-int8.safetensors --tokens 100 --repeat 3
"""

import argparse
import statistics
import time

CONSTRAINTS = {
    "json_schema": dict(json_schema={"type": "array", "minItems": 10000,
                                     "items": {"type": "object", "properties": {"name": {"type": "string"},
                                                                                "n": {"type": "integer"}},
                                               "required": ["name", "n"], "additionalProperties": False}}),
    # words up to a closing phrase no model writes by chance
    "regex": dict(regex=r"([A-Z]?[a-z]{1,12}[,.]? )+THE END OF THE LIST"),
    # a counted repetition: llguidance's lexer carries the count in its state, its worst case here
    "regex{2000}": dict(regex=r"([A-Z]?[a-z]{1,12}[,.]? ){2000}"),
    "grammar": dict(grammar='start: list{1000}\nlist: "[" item ("," item)* "]"\nitem: list | WORD\n'
                            'WORD: /[a-z]{1,20}/\n'),
}


def timed_run(model, prompt, tokens, constraint, seed):
    """(tokens/s of the generation, seconds in the constraint per token)."""
    from rwkvcpu.structured import ConstraintState
    spent = [0.0]
    mask, advance = ConstraintState.mask, ConstraintState.advance

    def timed(f):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    ConstraintState.mask, ConstraintState.advance = timed(mask), timed(advance)
    try:
        g = model.generate(prompt, max_tokens=tokens, seed=seed, stop_tokens=[], **(constraint or {}))
        for _ in g:
            pass
    finally:
        ConstraintState.mask, ConstraintState.advance = mask, advance
    n = len(g.tokens)
    assert n == tokens, f"the generation stopped after {n} tokens ({g.finish_reason})"
    return g.stats.generation_tokens_per_second, spent[0] / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model file (default: the shipped model)")
    ap.add_argument("--tokens", type=int, default=200, help="tokens per generation")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each (the median is reported)")
    ap.add_argument("--threads", type=int, default=None, help="model threads (default: one per core)")
    args = ap.parse_args()

    import rwkvcpu
    from rwkvcpu.models import default_model_path
    from rwkvcpu.structured import make_constraint
    model = rwkvcpu.load(args.model or default_model_path(), threads=args.threads)
    prompt = "Here is the list, as JSON:\n"
    runs = {"none": None}
    for name, kwargs in CONSTRAINTS.items():
        # compiled once, as a server compiles a request's constraint once
        runs[name] = dict(constraint=make_constraint(**kwargs))
    timed_run(model, prompt, 20, None, 0)                        # compile kernels, warm caches
    for c in runs.values():
        if c:
            timed_run(model, prompt, 20, c, 0)
    speeds = {name: [] for name in runs}
    spent = {name: [] for name in runs}
    for r in range(args.repeat):
        for name, c in runs.items():
            s, t = timed_run(model, prompt, args.tokens, c, r)
            speeds[name].append(s)
            spent[name].append(t)
    base = statistics.median(speeds["none"])
    print(f"model: {args.model or default_model_path().name}, vocabulary {model.config.vocab_size}, "
          f"{args.tokens} tokens x {args.repeat} runs each, interleaved")
    # The constraint's time as a share of an unconstrained token's: the slowdown it
    # causes, and steadier on a busy machine than the ratio of two speeds.
    print(f"{'constraint':<13} {'tokens/s':>9} {'vs none':>8} {'constraint us/token':>20} {'share of a token':>17}")
    for name in runs:
        med, cost = statistics.median(speeds[name]), statistics.median(spent[name])
        print(f"{name:<13} {med:9.1f} {med / base:8.3f} {cost * 1e6:20.1f} {cost * base:17.1%}")


if __name__ == "__main__":
    main()
