"""``python -m ringcomm.bench``: the command's name; the benchmark itself is ``ringcomm/tools/bench.py``."""

if __name__ == "__main__":
    from ringcomm.tools.bench import main

    main()
