// Which files `blip2 caption` works on: the arguments as given (files), folders searched
// recursively for images, and glob patterns (for shells that do not expand them, or quoted ones).
import * as fs from 'node:fs/promises';
import * as path from 'node:path';

import { glob, isDynamicPattern } from 'tinyglobby';

/** What a folder is searched for (case-insensitive). Files named explicitly are taken whatever their name. */
export const IMAGE_EXTENSIONS = ['jpg', 'jpeg', 'png', 'webp', 'gif', 'tif', 'tiff', 'avif'] as const;

export interface ExpandedInputs {
  /** Every file once (the first spelling wins), in argument order; a folder's or pattern's files sorted. */
  files: string[];
  /** Folders without images and patterns that matched nothing, with why, for a warning. */
  empty: string[];
}

const byName = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/**
 * Arguments → files. A path that exists is a file or a folder; one that does not is a glob
 * pattern when it has glob syntax, else it stays in the list as a file (reading it fails later
 * and is reported with the other per-file errors).
 */
export async function expandInputs(inputs: readonly string[], cwd = process.cwd()): Promise<ExpandedInputs> {
  const files: string[] = [];
  const empty: string[] = [];
  const seen = new Set<string>();
  const add = (file: string): void => {
    const key = path.resolve(cwd, file);
    if (seen.has(key)) return;
    seen.add(key);
    files.push(file);
  };
  for (const input of inputs) {
    const stat = await fs.stat(path.resolve(cwd, input)).catch(() => null);
    if (stat?.isDirectory()) {
      const found = await glob(`**/*.{${IMAGE_EXTENSIONS.join(',')}}`, {
        cwd: path.resolve(cwd, input), caseSensitiveMatch: false, expandDirectories: false, onlyFiles: true,
      });
      if (found.length === 0) empty.push(`${input} (a folder with no ${IMAGE_EXTENSIONS.join('/')} files)`);
      for (const file of found.sort(byName)) add(path.join(input, file));
    } else if (!stat && isDynamicPattern(input)) {
      const found = await glob(input, { cwd, absolute: path.isAbsolute(input), expandDirectories: false, onlyFiles: true });
      if (found.length === 0) empty.push(`${input} (no file matches)`);
      for (const file of found.sort(byName)) add(file);
    } else {
      add(input);
    }
  }
  return { files, empty };
}
