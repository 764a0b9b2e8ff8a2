"""The compiled masking engine (bastion/masking/_engine.c) is optional: where no C compiler
or no OpenSSL headers are found (Debian: gcc, python3-dev, libssl-dev), the install goes
on without it and the masker runs in Python, with the same output (bastion/masking/engine.py).
So is the recorder's JSON escaping (recorder/_escape.c; recorder/events.py has it in Python)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "bastion.masking._engine",
            ["bastion/masking/_engine.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            optional=True,
        ),
        # The recorder's JSON escaping of terminal output (recorder/events.py has the same in Python).
        Extension("recorder._escape", ["recorder/_escape.c"], extra_compile_args=["-O2", "-std=c11", "-Wall"],
                  optional=True),
        # The search summaries' trigram filter (recorder/summary.py); without it recordings
        # get no summaries and search reads every segment.
        Extension(
            "recorder._summary",
            ["recorder/_summary.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall"],
            optional=True,
        ),
    ]
)
