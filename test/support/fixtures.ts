import * as fs from 'node:fs';
import * as path from 'node:path';

import { Tensor } from '../../lib';
import { FIXTURES_DIR } from './python';
import { SafeTensorsFile } from './safetensors';

export interface FixtureGeneration {
  name: string;
  image: string;
  prompt: string;
  kwargs: Record<string, number | boolean>;
  input_ids: number[][];
  attention_mask: number[][];
  sequences: number[][];
  sequences_scores?: number[];
  step_logits_tensor?: string;
}

export interface FixtureBatch {
  name: string;
  images?: string[];
  texts: string[];
  padding_side: string;
  kwargs?: Record<string, number | boolean>;
  input_ids: number[][];
  attention_mask: number[][];
  sequences?: number[][];
  decoded?: string[];
  forward_logits_tensor?: string;
}

export interface ExpectedJson {
  meta: Record<string, unknown> & { image_token_index: number; prompts: Record<string, string>; images: Record<string, string> };
  processor_outputs: Record<string, { text: string; input_ids: number[][]; attention_mask: number[][] }>;
  generations: FixtureGeneration[];
  batched_generations: FixtureBatch[];
  legacy_path: Array<FixtureGeneration & { prompt: string | null }>;
}

let expectedJson: ExpectedJson | undefined;
let expectedTensors: SafeTensorsFile | undefined;

export function expected(): ExpectedJson {
  expectedJson ??= JSON.parse(fs.readFileSync(path.join(FIXTURES_DIR, 'tiny-opt-expected', 'expected.json'), 'utf8')) as ExpectedJson;
  return expectedJson;
}

export function expectedTensorsFile(): SafeTensorsFile {
  expectedTensors ??= new SafeTensorsFile(path.join(FIXTURES_DIR, 'tiny-opt-expected', 'expected.safetensors'));
  return expectedTensors;
}

/** A fixture tensor as a Tensor handle. */
export function fixtureTensor(name: string): Tensor {
  const t = expectedTensorsFile().get(name);
  return Tensor.from(t.data, t.shape);
}

export function fixtureFloats(name: string): Float32Array {
  return expectedTensorsFile().get(name).data as Float32Array;
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let max = 0;
  for (let i = 0; i < a.length; i++) max = Math.max(max, Math.abs(a[i] - b[i]));
  return max;
}

export function ids(rows: number[][]): Tensor {
  return Tensor.from(rows, undefined, { dtype: 'int64' });
}

export async function rowsOf(t: Tensor): Promise<number[][]> {
  const flat = Array.from((await t.toArray()) as ArrayLike<bigint | number>, Number);
  const [rows, cols] = t.shape;
  return Array.from({ length: rows }, (_, r) => flat.slice(r * cols, (r + 1) * cols));
}
