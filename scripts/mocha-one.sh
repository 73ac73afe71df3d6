#!/usr/bin/env bash
# Runs the given spec files only (the .mocharc spec list would add every test).
exec npx mocha --no-config --require tsx --node-option expose-gc --timeout 120000 "$@"
