#!/usr/bin/env python3
"""Runs SQL statements on current ClickHouse, in process, through chdb.

Usage: run_sql.py FILE, where FILE holds statements separated by lines of exactly '-- ;;'.
Prints the ClickHouse version; exits 1 naming the first statement that fails.
"""
import sys
import tempfile

from chdb import session


def main() -> int:
    text = open(sys.argv[1], encoding="utf-8").read()
    statements = [s.strip() for s in text.split("\n-- ;;\n") if s.strip()]
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        print("clickhouse", str(s.query("SELECT version()")).strip())
        for i, stmt in enumerate(statements):
            try:
                s.query(stmt)
            except Exception as e:  # chdb raises its own error types
                print(f"statement {i} failed on current ClickHouse: {e}\n{stmt}", file=sys.stderr)
                return 1
        # Read back so a silently ignored statement cannot pass.
        for stmt in [x for x in statements if x.startswith("SELECT")]:
            print(str(s.query(stmt, "CSV")).strip())
        print(f"{len(statements)} statements ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
