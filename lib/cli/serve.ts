// `blip2 serve`: runs a Blip2Server until SIGTERM or SIGINT, then shuts it down gracefully.
import { Blip2Error } from '../errors';
import { Blip2Server, type ServeOptions } from '../server/server';

export interface ServeCliOptions extends ServeOptions {
  /** In-flight requests get this long to finish at shutdown before they are cancelled (ms). */
  shutdownTimeoutMs: number;
}

/** Resolves to the exit code: 0 after a shutdown by signal, 1 when the server cannot start. */
export async function runServe(options: ServeCliOptions, stderr: { write(text: string): boolean } = process.stderr): Promise<number> {
  const log = (line: string): void => { stderr.write(`blip2 serve: ${line}\n`); };
  const server = new Blip2Server({ ...options, log });
  let signalled: NodeJS.Signals | undefined;
  let onSignal: (signal: NodeJS.Signals) => void = () => {};
  const stopped = new Promise<void>((resolve) => {
    onSignal = (signal: NodeJS.Signals): void => {
      if (signalled) {
        // A second signal: do not wait for the requests in flight.
        log(`${signal} again: cancelling the requests in flight`);
        void server.shutdown(0);
        return;
      }
      signalled = signal;
      log(`${signal}: shutting down (requests in flight may finish within ${options.shutdownTimeoutMs / 1000} s)`);
      void server.shutdown(options.shutdownTimeoutMs).then(resolve, (e: unknown) => {
        log(`shutdown failed: ${(e as Error).stack ?? String(e)}`);
        resolve();
      });
    };
    process.on('SIGTERM', onSignal);
    process.on('SIGINT', onSignal);
  });
  try {
    let address;
    try {
      address = await server.listen();
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      log(`cannot listen on ${options.host ?? '127.0.0.1'}:${options.port ?? 8080}: ${err.code ?? ''} ${err.message}`);
      return 1;
    }
    const host = address.family === 'IPv6' ? `[${address.address}]` : address.address;
    log(`listening on http://${host}:${address.port} (loading ${options.modelDir} on ${options.device ?? 'cpu'})`);
    const loadStarted = performance.now();
    try {
      await server.load();
    } catch (e) {
      if (signalled) {
        await stopped;
        return 0;
      }
      log(`cannot load the model: ${e instanceof Blip2Error ? `${e.name} (${e.code}): ${e.message}` : (e as Error).stack ?? String(e)}`);
      await server.shutdown(0);
      return 1;
    }
    if (!signalled) {
      const stats = server.model!.stats();
      log(`ready: ${server.modelName} on ${server.model!.device} in ${((performance.now() - loadStarted) / 1000).toFixed(1)} s `
        + `(${stats.slots} slots of ${stats.maxLength} positions; POST /v1/chat/completions, GET /health, GET /metrics)`);
    }
    await stopped;
    log('stopped');
    return 0;
  } finally {
    process.removeListener('SIGTERM', onSignal);
    process.removeListener('SIGINT', onSignal);
  }
}
