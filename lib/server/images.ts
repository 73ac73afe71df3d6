// The image of a chat request: a data:image/...;base64 URL, or (only when the server was started
// with --allow-local-images DIR) a file inside DIR. Remote URLs are never fetched: a server that
// fetches what clients name is an open proxy.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

import { HttpError, badRequest } from './http-error';

export interface ImageSourceOptions {
  /** The real path (fs.realpathSync) of the folder local images may come from; undefined: none may. */
  localRoot?: string;
  /** Largest local file read, in bytes (a data URL is bounded by the body limit already). */
  maxFileBytes: number;
}

// Standard and URL-safe alphabets, padding optional: clients differ.
const BASE64 = /^[A-Za-z0-9+/_-]*={0,2}$/;

/** The image's bytes; a 400 naming `param` for anything but a usable data URL or allowed file. */
export async function loadImage(url: unknown, param: string, options: ImageSourceOptions): Promise<Buffer> {
  if (typeof url !== 'string' || url === '') throw badRequest(param, 'expected a data:image/...;base64,... URL');
  if (/^data:/i.test(url)) return decodeDataUrl(url, param);
  let file: string;
  if (/^file:/i.test(url)) {
    try {
      file = fileURLToPath(url);
    } catch (e) {
      throw badRequest(param, `not a usable file: URL (${(e as Error).message})`, 'invalid_image_url');
    }
  } else if (/^[a-z][a-z0-9+.-]*:/i.test(url)) {
    throw badRequest(param, `${url.slice(0, url.indexOf(':') + 1)} URLs are not fetched; send the image as a data:image/...;base64,... URL`, 'invalid_image_url');
  } else {
    file = url;
  }
  if (options.localRoot === undefined) {
    throw badRequest(param, 'local image paths are not accepted: send a data:image/...;base64,... URL (or start the server with --allow-local-images DIR)', 'local_images_disabled');
  }
  return readLocal(file, param, options.localRoot, options.maxFileBytes);
}

function decodeDataUrl(url: string, param: string): Buffer {
  const comma = url.indexOf(',');
  const header = comma < 0 ? url : url.slice(0, comma);
  const match = /^data:(image\/[a-z0-9.+-]+)((?:;[a-z0-9-]+=[^;,]*)*);base64$/i.exec(header);
  if (!match) throw badRequest(param, `expected a data:image/...;base64,... URL, got one starting ${JSON.stringify(header.slice(0, 40))}`, 'invalid_image_url');
  const data = url.slice(comma + 1);
  if (data.length === 0) throw badRequest(param, 'the data URL holds no data', 'invalid_image_url');
  if (!BASE64.test(data) || data.length % 4 === 1) throw badRequest(param, 'the data URL is not valid base64', 'invalid_image_url');
  return Buffer.from(data, 'base64');
}

function inside(root: string, file: string): boolean {
  const rel = path.relative(root, file);
  return rel !== '' && rel !== '..' && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel);
}

async function readLocal(file: string, param: string, root: string, maxFileBytes: number): Promise<Buffer> {
  if (file.includes('\0')) throw badRequest(param, 'the path holds a NUL byte', 'invalid_image_url');
  const outside = (): HttpError => badRequest(param, 'the path is outside the folder the server allows local images from (--allow-local-images)', 'path_outside_allowed_dir');
  // Relative paths are relative to the allowed folder. Checked twice: the path as written (no
  // '..' escape), then the real path (no symbolic link out of the folder).
  const resolved = path.resolve(root, file);
  if (!inside(root, resolved)) throw outside();
  let real: string;
  try {
    real = await fs.promises.realpath(resolved);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw badRequest(param, code === 'ENOENT' ? 'no such image file' : `cannot read the image file (${code})`, 'image_not_found');
  }
  if (!inside(root, real)) throw outside();
  // Open once and check what was opened, so a file swapped after the checks is not read.
  let handle: fs.promises.FileHandle;
  try {
    handle = await fs.promises.open(real, 'r');
  } catch (e) {
    throw badRequest(param, `cannot read the image file (${(e as NodeJS.ErrnoException).code})`, 'image_unreadable');
  }
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw badRequest(param, 'not a regular file', 'image_unreadable');
    if (stat.size > maxFileBytes) {
      throw new HttpError(413, `the image file has ${stat.size} bytes, more than the server's limit of ${maxFileBytes} (--max-body-bytes)`, { code: 'image_too_large', param });
    }
    return await handle.readFile();
  } finally {
    await handle.close();
  }
}
