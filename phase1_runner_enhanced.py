#!/usr/bin/env python
"""Legacy entry point: older scripts call this file with the same flags as esa_runner.py."""

import sys

import esa_runner

if __name__ == "__main__":
    sys.exit(esa_runner.main())
