// GET /metrics: the server's counters and the model scheduler's live figures in Prometheus' text
// exposition format (version 0.0.4).
import type { ModelStats } from '../models/blip2/modeling-blip2';

/** Upper bounds (seconds) of the latency histogram's buckets: a token takes ms, a long answer tens of seconds. */
const LATENCY_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120];

export type CancelReason = 'disconnect' | 'timeout' | 'shutdown';

export class Metrics {
  readonly #requests = new Map<string, number>();
  readonly #cancelled = new Map<CancelReason, number>();
  readonly #buckets = new Array<number>(LATENCY_BUCKETS.length).fill(0);
  #latencyCount = 0;
  #latencySum = 0;
  promptTokens = 0;
  completionTokens = 0;
  inFlight = 0;

  /** One answered request: its route ('other' for unknown paths) and status. */
  request(route: string, status: number): void {
    const key = `${route}\u0000${status}`;
    this.#requests.set(key, (this.#requests.get(key) ?? 0) + 1);
  }

  /** A generation stopped before its end. */
  cancelled(reason: CancelReason): void {
    this.#cancelled.set(reason, (this.#cancelled.get(reason) ?? 0) + 1);
  }

  /** The wall time of one successful chat completion, request received to last byte. */
  latency(seconds: number): void {
    this.#latencyCount++;
    this.#latencySum += seconds;
    const at = LATENCY_BUCKETS.findIndex((b) => seconds <= b);
    if (at >= 0) this.#buckets[at]++;
  }

  render(stats: ModelStats | null, extra: { uptimeSeconds: number; ready: boolean }): string {
    const out: string[] = [];
    const metric = (name: string, type: 'counter' | 'gauge' | 'histogram', help: string, samples: Array<[string, number]>): void => {
      out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [labels, value] of samples) out.push(`${name}${labels} ${Number.isFinite(value) ? value : 0}`);
    };
    const label = (pairs: Record<string, string | number>): string =>
      `{${Object.entries(pairs).map(([k, v]) => `${k}="${String(v).replace(/["\\\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`))}"`).join(',')}}`;

    metric('blip2_http_requests_total', 'counter', 'HTTP requests answered, by route and status code.',
      [...this.#requests].map(([key, n]) => {
        const [route, code] = key.split('\u0000');
        return [label({ route, code }), n];
      }));
    metric('blip2_http_requests_in_flight', 'gauge', 'Chat completion requests being served.', [['', this.inFlight]]);
    metric('blip2_generations_cancelled_total', 'counter', 'Generations stopped early: client disconnect, request timeout or shutdown.',
      (['disconnect', 'timeout', 'shutdown'] as const).map((r) => [label({ reason: r }), this.#cancelled.get(r) ?? 0]));
    metric('blip2_prompt_tokens_total', 'counter', 'Prompt tokens of served requests (image query tokens included).', [['', this.promptTokens]]);
    metric('blip2_completion_tokens_total', 'counter', 'Tokens generated for served requests.', [['', this.completionTokens]]);

    const cumulative: Array<[string, number]> = [];
    let running = 0;
    LATENCY_BUCKETS.forEach((b, i) => {
      running += this.#buckets[i];
      cumulative.push([`_bucket${label({ le: b })}`, running]);
    });
    cumulative.push(['_bucket{le="+Inf"}', this.#latencyCount], ['_sum', this.#latencySum], ['_count', this.#latencyCount]);
    out.push('# HELP blip2_request_duration_seconds Wall time of successful chat completions.', '# TYPE blip2_request_duration_seconds histogram');
    for (const [suffix, value] of cumulative) out.push(`blip2_request_duration_seconds${suffix} ${value}`);

    metric('blip2_up', 'gauge', '1 when the model is loaded and requests are accepted.', [['', extra.ready ? 1 : 0]]);
    if (stats) {
      metric('blip2_queue_length', 'gauge', 'generate() calls waiting for KV-cache slots.', [['', stats.queued]]);
      metric('blip2_running_calls', 'gauge', 'generate() calls admitted (prefilling or decoding).', [['', stats.runningCalls]]);
      metric('blip2_running_sequences', 'gauge', 'Sequences in the last decode step.', [['', stats.runningSequences]]);
      metric('blip2_slots_in_use', 'gauge', 'KV-cache slots in use.', [['', stats.slotsInUse]]);
      metric('blip2_slots', 'gauge', 'KV-cache slots in all (sequences decoded together at most).', [['', stats.slots]]);
      metric('blip2_kv_cache_bytes', 'gauge', "Bytes of the model's KV cache.", [['', stats.kvCacheBytes]]);
      metric('blip2_tokens_per_second', 'gauge', 'Decoded tokens per second over recent steps (moving average).', [['', stats.tokensPerSecond]]);
      metric('blip2_model_generated_tokens_total', 'counter', "Tokens the model's scheduler decoded.", [['', stats.generatedTokens]]);
      metric('blip2_model_decode_steps_total', 'counter', 'Decode steps run.', [['', stats.decodeSteps]]);
      metric('blip2_model_calls_total', 'counter', 'generate() calls finished, by outcome.',
        [[label({ outcome: 'completed' }), stats.completedCalls], [label({ outcome: 'failed' }), stats.failedCalls]]);
    }
    metric('process_resident_memory_bytes', 'gauge', 'Resident memory of the server process.', [['', process.memoryUsage.rss()]]);
    metric('process_uptime_seconds', 'gauge', 'Seconds since the server started.', [['', extra.uptimeSeconds]]);
    return `${out.join('\n')}\n`;
  }
}
