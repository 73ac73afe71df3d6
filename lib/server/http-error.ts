// Errors as the server answers them: an HTTP status and OpenAI's error body
// `{ error: { message, type, param, code } }`, and the mapping of the library's typed errors to them.
import {
  AbortError, Blip2Error, DisposedError, ImageDecodeError, InvalidArgumentError, OutOfMemoryError, QueueFullError,
} from '../errors';

export type ErrorType = 'invalid_request_error' | 'not_found_error' | 'rate_limit_error' | 'server_error' | 'timeout_error';

/** What the server answers for a request that fails; `param` names the request field at fault (OpenAI's convention). */
export class HttpError extends Error {
  readonly status: number;
  readonly type: ErrorType;
  readonly code: string;
  readonly param: string | null;
  readonly headers: Record<string, string>;
  constructor(status: number, message: string, options: { type?: ErrorType; code: string; param?: string | null; headers?: Record<string, string> }) {
    super(message);
    this.name = 'HttpError';
    this.status = status;
    this.type = options.type ?? (status >= 500 ? 'server_error' : 'invalid_request_error');
    this.code = options.code;
    this.param = options.param ?? null;
    this.headers = options.headers ?? {};
  }

  body(): { error: { message: string; type: ErrorType; param: string | null; code: string } } {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** 400 for a field of the request: `param` is its path, e.g. `messages[0].content[1].image_url.url`. */
export function badRequest(param: string | null, message: string, code = 'invalid_value'): HttpError {
  return new HttpError(400, message, { code, param });
}

export const shuttingDown = (): HttpError =>
  new HttpError(503, 'the server is shutting down', { code: 'shutting_down', headers: { 'retry-after': '5', connection: 'close' } });

export const requestTimedOut = (ms: number): HttpError =>
  new HttpError(504, `the request took longer than the server's request timeout (${ms / 1000} s)`, { type: 'timeout_error', code: 'request_timeout' });

/** Where a library error's `argument` comes from in the request (generate option → request field). */
export interface ParamNames {
  /** The field of the image (an ImageDecodeError names it). */
  image: string;
  /** max_tokens or max_completion_tokens, whichever the request used. */
  maxTokens: string;
}

const OPTION_PARAMS: Record<string, keyof ParamNames | string> = {
  maxNewTokens: 'maxTokens', temperature: 'temperature', topP: 'top_p', topK: 'top_k', seed: 'seed',
  repetitionPenalty: 'repetition_penalty', numReturnSequences: 'n', doSample: 'temperature',
};

/**
 * The answer for an error thrown while serving a request: the library's typed errors keep their
 * message (it names the value and what was expected); anything else is a 500.
 */
export function toHttpError(error: unknown, params: ParamNames): HttpError {
  if (error instanceof HttpError) return error;
  if (error instanceof QueueFullError) {
    return new HttpError(429, `${error.message}; retry later`, { type: 'rate_limit_error', code: 'queue_full', headers: { 'retry-after': '1' } });
  }
  if (error instanceof ImageDecodeError) {
    // The batch position means nothing to a client that sent one image: name the field instead.
    return badRequest(params.image, `the image cannot be used: ${error.message.replace(/^image at index \d+: /, '')}`, 'invalid_image');
  }
  if (error instanceof InvalidArgumentError) {
    const mapped = error.argument === undefined ? undefined : OPTION_PARAMS[error.argument];
    const param = mapped === undefined ? 'messages' : mapped in params ? params[mapped as keyof ParamNames] : mapped;
    return badRequest(param, error.message);
  }
  if (error instanceof DisposedError) return shuttingDown();
  if (error instanceof OutOfMemoryError) {
    return new HttpError(503, `out of memory: ${error.message}`, { code: 'out_of_memory', headers: { 'retry-after': '1' } });
  }
  if (error instanceof AbortError) return new HttpError(500, 'the generation was aborted', { code: 'aborted' });
  const message = error instanceof Blip2Error ? `${error.name} (${error.code}): ${error.message}` : 'internal server error';
  return new HttpError(500, message, { code: 'internal_error' });
}
