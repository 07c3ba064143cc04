//! Quantizers and dequantizers for the ggml types retort writes, bit-exact with ggml's reference
//! implementation (no importance matrix), and the llama.cpp file-type mixes in [`mix`].
//!
//! Blocks are independent, so a tensor is cut into chunks of whole blocks that rayon quantizes in
//! parallel; the result does not depend on the number of threads.

pub mod float;
pub mod kfast;
pub mod kquants;
pub mod legacy;
pub mod mix;

use rayon::prelude::*;

use crate::gguf::types::GgmlType;

type BlockFn = fn(&[f32], &mut [u8]);
type DeqFn = fn(&[u8], &mut [f32]);

fn block_fns(ty: GgmlType) -> Option<(BlockFn, DeqFn)> {
    Some(match ty {
        GgmlType::Q4_0 => (legacy::q4_0, legacy::dq4_0),
        GgmlType::Q4_1 => (legacy::q4_1, legacy::dq4_1),
        GgmlType::Q5_0 => (legacy::q5_0, legacy::dq5_0),
        GgmlType::Q5_1 => (legacy::q5_1, legacy::dq5_1),
        GgmlType::Q8_0 => (legacy::q8_0, legacy::dq8_0),
        GgmlType::Q4_K => (kfast::q4_k, kquants::dq4_k),
        GgmlType::Q5_K => (kfast::q5_k, kquants::dq5_k),
        GgmlType::Q6_K => (kfast::q6_k, kquants::dq6_k),
        GgmlType::Q8_K => (kquants::q8_k, kquants::dq8_k),
        _ => return None,
    })
}

/// The types [`quantize`] can write.
pub const WRITABLE: [GgmlType; 12] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
];

/// Elements per parallel work item: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 64 * 256;

/// Encodes `src` as `ty`. `src.len()` must be a whole number of the type's blocks (the caller checks
/// rows; for k-quants a row must be a multiple of 256).
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, String> {
    let bs = ty.block_size();
    if !src.len().is_multiple_of(bs) {
        return Err(format!("{} values are not a whole number of {ty} blocks ({bs})", src.len()));
    }
    let nbytes = src.len() / bs * ty.type_size();
    let mut out = vec![0u8; nbytes];
    match ty {
        GgmlType::F32 => out.par_chunks_mut(4 * CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
            s.iter().zip(o.chunks_exact_mut(4)).for_each(|(v, b)| b.copy_from_slice(&v.to_le_bytes()))
        }),
        GgmlType::F16 | GgmlType::BF16 => {
            let conv = if ty == GgmlType::F16 { float::f16_bits } else { float::bf16_bits };
            out.par_chunks_mut(2 * CHUNK).zip(src.par_chunks(CHUNK)).for_each(|(o, s)| {
                s.iter()
                    .zip(o.chunks_exact_mut(2))
                    .for_each(|(v, b)| b.copy_from_slice(&conv(*v).to_le_bytes()))
            });
        }
        _ => {
            let (f, _) = block_fns(ty).ok_or_else(|| format!("retort cannot quantize to {ty}"))?;
            let ts = ty.type_size();
            let per = CHUNK.div_ceil(bs) * bs;
            out.par_chunks_mut(per / bs * ts).zip(src.par_chunks(per)).for_each(|(o, s)| {
                for (ob, sb) in o.chunks_exact_mut(ts).zip(s.chunks_exact(bs)) {
                    f(sb, ob);
                }
            });
        }
    }
    Ok(out)
}

/// Decodes `n` values of type `ty` from `data`.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, String> {
    let bs = ty.block_size();
    let ts = ty.type_size();
    if !n.is_multiple_of(bs) || data.len() != n / bs * ts {
        return Err(format!("{} bytes do not hold {n} values of {ty}", data.len()));
    }
    let mut out = vec![0f32; n];
    match ty {
        GgmlType::F32 => out
            .iter_mut()
            .zip(data.chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        GgmlType::F16 => out
            .iter_mut()
            .zip(data.chunks_exact(2))
            .for_each(|(o, b)| *o = float::f16_value(u16::from_le_bytes([b[0], b[1]]))),
        GgmlType::BF16 => out
            .iter_mut()
            .zip(data.chunks_exact(2))
            .for_each(|(o, b)| *o = float::bf16_value(u16::from_le_bytes([b[0], b[1]]))),
        _ => {
            let (_, g) = block_fns(ty).ok_or_else(|| format!("retort cannot dequantize {ty}"))?;
            out.par_chunks_mut(CHUNK.div_ceil(bs) * bs)
                .zip(data.par_chunks(CHUNK.div_ceil(bs) * ts))
                .for_each(|(o, d)| {
                    for (ob, db) in o.chunks_exact_mut(bs).zip(d.chunks_exact(ts)) {
                        g(db, ob);
                    }
                });
        }
    }
    Ok(out)
}

/// Counts non-finite values of an encoded tensor without decoding it all: for block types a value is
/// finite exactly when its block's f16 (or f32) scales are (the quantized integers are bounded).
pub fn count_non_finite(ty: GgmlType, data: &[u8]) -> usize {
    fn f16_at(b: &[u8], at: usize) -> bool {
        float::f16_value(u16::from_le_bytes([b[at], b[at + 1]])).is_finite()
    }
    fn d(b: &[u8]) -> bool {
        f16_at(b, 0)
    }
    fn d_m(b: &[u8]) -> bool {
        f16_at(b, 0) && f16_at(b, 2)
    }
    fn d_q6(b: &[u8]) -> bool {
        f16_at(b, 208)
    }
    fn d_f32(b: &[u8]) -> bool {
        f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()
    }
    let (ts, bs) = (ty.type_size(), ty.block_size());
    let check: Option<fn(&[u8]) -> bool> = match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => Some(d),
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => Some(d_m),
        GgmlType::Q6_K => Some(d_q6),
        GgmlType::Q8_K => Some(d_f32),
        _ => None,
    };
    if let Some(ok) = check {
        return data.par_chunks(ts * 1024).map(|c| c.chunks_exact(ts).filter(|b| !ok(b)).count() * bs).sum();
    }
    let decode: fn(&[u8]) -> f32 = match ty {
        GgmlType::F16 => |b| float::f16_value(u16::from_le_bytes([b[0], b[1]])),
        GgmlType::BF16 => |b| float::bf16_value(u16::from_le_bytes([b[0], b[1]])),
        _ => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    };
    data.par_chunks(ts * CHUNK).map(|c| c.chunks_exact(ts).filter(|b| !decode(b).is_finite()).count()).sum()
}

/// Encodes a stored tensor as `ty` straight from its bytes, chunk by chunk: no f32 copy of the whole
/// tensor is made (the largest cost of a plain conversion). Returns the bytes and the number of
/// non-finite input values (the caller refuses the tensor if there are any). Same bytes as
/// [`quantize`] of [`view_to_f32`].
pub fn quantize_view(ty: GgmlType, view: &retort_hf::TensorView<'_>) -> Result<(Vec<u8>, usize), String> {
    let (conv, size): (fn(&[u8]) -> f32, usize) = match view.dtype {
        retort_hf::Dtype::F32 => (|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]), 4),
        retort_hf::Dtype::F16 => (|b| float::f16_value(u16::from_le_bytes([b[0], b[1]])), 2),
        retort_hf::Dtype::BF16 => (|b| float::bf16_value(u16::from_le_bytes([b[0], b[1]])), 2),
        retort_hf::Dtype::Other(d) => return Err(format!("tensor `{}` is {d}, not a float type", view.name)),
    };
    let n = view.numel();
    let bs = ty.block_size();
    if !n.is_multiple_of(bs) {
        return Err(format!("{n} values are not a whole number of {ty} blocks ({bs})"));
    }
    let ts = ty.type_size();
    let per = CHUNK.div_ceil(bs) * bs;
    let mut out = vec![0u8; n / bs * ts];
    let same = matches!(
        (ty, view.dtype),
        (GgmlType::F32, retort_hf::Dtype::F32)
            | (GgmlType::F16, retort_hf::Dtype::F16)
            | (GgmlType::BF16, retort_hf::Dtype::BF16)
    );
    let block = block_fns(ty).map(|f| f.0);
    let bad = out
        .par_chunks_mut(per / bs * ts)
        .zip(view.data.par_chunks(per * size))
        .map(|(o, d)| {
            let x: Vec<f32> = d.chunks_exact(size).map(conv).collect();
            let bad = x.iter().filter(|v| !v.is_finite()).count();
            if same {
                o.copy_from_slice(d);
            } else if let Some(f) = block {
                for (ob, xb) in o.chunks_exact_mut(ts).zip(x.chunks_exact(bs)) {
                    f(xb, ob);
                }
            } else {
                let enc: fn(f32) -> Vec<u8> = match ty {
                    GgmlType::F16 => |v| float::f16_bits(v).to_le_bytes().to_vec(),
                    GgmlType::BF16 => |v| float::bf16_bits(v).to_le_bytes().to_vec(),
                    _ => |v| v.to_le_bytes().to_vec(),
                };
                for (ob, v) in o.chunks_exact_mut(ts).zip(&x) {
                    ob.copy_from_slice(&enc(*v));
                }
            }
            bad
        })
        .sum();
    if block.is_none() && !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
        return Err(format!("retort cannot quantize to {ty}"));
    }
    Ok((out, bad))
}

/// A safetensors tensor's values as f32, converted in parallel.
pub fn view_to_f32(view: &retort_hf::TensorView<'_>) -> Result<Vec<f32>, retort_hf::WeightsError> {
    let conv: fn(&[u8]) -> f32 = match view.dtype {
        retort_hf::Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        retort_hf::Dtype::F16 => |b| float::f16_value(u16::from_le_bytes([b[0], b[1]])),
        retort_hf::Dtype::BF16 => |b| float::bf16_value(u16::from_le_bytes([b[0], b[1]])),
        retort_hf::Dtype::Other(_) => return view.to_f32(),
    };
    let size = view.dtype.size();
    let mut out = vec![0f32; view.numel()];
    out.par_chunks_mut(CHUNK).zip(view.data.par_chunks(CHUNK * size)).for_each(|(o, d)| {
        for (x, b) in o.iter_mut().zip(d.chunks_exact(size)) {
            *x = conv(b);
        }
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        // llama.cpp's test-quantize-fns data.
        (0..n).map(|i| (0.1f64 + f64::from(2.0f32 * (i as f32).cos())) as f32).collect()
    }

    /// The fast k-quants against the reference ports, on random data with edge cases.
    #[test]
    fn fast_k_quants_equal_the_reference() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut x: Vec<f32> = (0..256 * 600).map(|_| next() * 0.1).collect();
        for (b, block) in x.chunks_mut(256).enumerate() {
            match b % 14 {
                0 => block.fill(0.0),
                1 => block[..32].fill(0.0),
                2 => block.iter_mut().for_each(|v| *v = v.abs()),
                3 => block.iter_mut().for_each(|v| *v = -v.abs() * 1e4),
                4 => block[..64].fill(0.25),
                5 => block.iter_mut().step_by(7).for_each(|v| *v *= 300.0),
                6 => block.iter_mut().for_each(|v| *v *= 1e-30),
                7 => block[100..116].fill(-0.0),
                // Nearly constant negative blocks: the fitted min can pass the max (degenerate scales).
                8 => block.iter_mut().for_each(|v| *v = -1.0 - *v * 1e-4),
                9 => block.iter_mut().for_each(|v| *v = 3.0 + *v * 1e-6),
                10 => {
                    block.iter_mut().enumerate().for_each(|(i, v)| *v *= if i % 32 == 0 { 1e6 } else { 1e-6 })
                }
                11 => block.iter_mut().for_each(|v| *v = (*v * 8.0).round() / 8.0),
                _ => {}
            }
        }
        type F = fn(&[f32], &mut [u8]);
        let pairs: [(GgmlType, F, F); 3] = [
            (GgmlType::Q4_K, kquants::q4_k, kfast::q4_k),
            (GgmlType::Q5_K, kquants::q5_k, kfast::q5_k),
            (GgmlType::Q6_K, kquants::q6_k, kfast::q6_k),
        ];
        for (ty, reference, fast) in pairs {
            let ts = ty.type_size();
            for (i, block) in x.chunks(256).enumerate() {
                let (mut a, mut b) = (vec![0u8; ts], vec![0u8; ts]);
                reference(block, &mut a);
                fast(block, &mut b);
                assert_eq!(a, b, "{ty} block {i}");
            }
        }
    }

    #[test]
    fn quantize_view_equals_quantize_of_the_values() {
        let x = data(256 * 70);
        for (dtype, bytes) in [
            (
                retort_hf::Dtype::BF16,
                x.iter().flat_map(|&v| float::bf16_bits(v).to_le_bytes()).collect::<Vec<u8>>(),
            ),
            (retort_hf::Dtype::F16, x.iter().flat_map(|&v| float::f16_bits(v).to_le_bytes()).collect()),
            (retort_hf::Dtype::F32, x.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ] {
            let shape = [70usize, 256];
            let view = retort_hf::TensorView {
                name: "t",
                dtype: &dtype,
                shape: &shape,
                data: &bytes,
                path: std::path::Path::new("t"),
            };
            let values = view_to_f32(&view).unwrap();
            for ty in WRITABLE {
                let (q, bad) = quantize_view(ty, &view).unwrap();
                assert_eq!(bad, 0);
                assert!(q == quantize(ty, &values).unwrap(), "{ty} from {dtype:?}");
            }
        }
    }

    #[test]
    fn round_trip_sizes_and_parallel_determinism() {
        let x = data(256 * 200);
        for ty in WRITABLE {
            let q = quantize(ty, &x).unwrap();
            assert_eq!(q.len(), x.len() / ty.block_size() * ty.type_size(), "{ty}");
            // Block by block, single-threaded, gives the same bytes.
            if let Some((f, _)) = block_fns(ty) {
                let mut one = vec![0u8; q.len()];
                for (o, s) in one.chunks_exact_mut(ty.type_size()).zip(x.chunks_exact(ty.block_size())) {
                    f(s, o);
                }
                assert_eq!(one, q, "{ty}");
            }
            let y = dequantize(ty, &q, x.len()).unwrap();
            assert_eq!(y.len(), x.len());
        }
        assert!(quantize(GgmlType::Q4_K, &x[..100]).is_err());
    }
}
