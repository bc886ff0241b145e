#!/bin/sh
# Make sure Debian's chromium is installed, for the book's browser checks (tests/browser.py drives it
# with Playwright, for tests/test_book_offline.py and tests/test_book.py). Idempotent: does nothing when
# the browser exists.
# Installs it only as root with apt-get (the apt mirrors are reachable).
# When it cannot: on CI (CI set, and not false/0/no) it exits 1, because there the browser tests fail
# rather than skip (tests/browser.py); elsewhere it says in one line that the browser checks will be
# skipped and exits 0, so that `make test` goes on.
set -eu
CHROMIUM=${TASKVEC_CHROMIUM:-/usr/bin/chromium}

case "$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
    "" | false | 0 | no) ON_CI= ;;
    *) ON_CI=1 ;;
esac

cannot() {  # $1: why
    if [ -n "$ON_CI" ]; then
        echo "ensure_chromium: error: $1; CI=$CI, where the browser checks must run, not skip" >&2
        exit 1
    fi
    echo "ensure_chromium: $1: browser checks will be skipped"
    exit 0
}

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$CHROMIUM" != /usr/bin/chromium ]; then
    cannot "$CHROMIUM (TASKVEC_CHROMIUM) missing; only Debian's /usr/bin/chromium is installed here"
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    cannot "$CHROMIUM missing and cannot install it (needs root and apt-get)"
fi
echo "ensure_chromium: installing Debian chromium (apt-get)..."
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null && [ -x "$CHROMIUM" ]; then
    echo "ensure_chromium: $("$CHROMIUM" --version 2>/dev/null || echo installed)"
else
    cannot "apt-get install chromium failed"
fi
exit 0
