//! The `[P, A, G, B]` view of SPEC.md §1 and the shape checks of each op.
//!
//! Statistics are taken per group `(p, g)` over the `A·B` elements
//! `x[p, a, g, b]`; the affine index of an element is `(g·B + b) / affine_div`.
//! Every normalization is one row of the table in SPEC.md §1, built here.

use crate::error::{Error, Result};

/// How a contiguous tensor is grouped for statistics and affine parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    /// Independent outer blocks (rows of LayerNorm, N of InstanceNorm).
    pub p: usize,
    /// Reduced dimension between the outer block and the group index.
    pub a: usize,
    /// Groups per outer block (channels of BatchNorm).
    pub g: usize,
    /// Reduced contiguous inner dimension.
    pub b: usize,
    /// Divisor turning `g·B + b` into the affine index.
    pub affine_div: usize,
    /// Length of the weight and bias vectors.
    pub affine_len: usize,
}

impl View {
    /// Elements of the whole tensor.
    pub fn numel(&self) -> usize {
        self.p * self.a * self.g * self.b
    }

    /// Number of statistics groups (`P·G`).
    pub fn groups(&self) -> usize {
        self.p * self.g
    }

    /// Elements per group (`A·B`).
    pub fn group_len(&self) -> usize {
        self.a * self.b
    }

    /// BatchNorm over channel axis `axis` of `shape` (1 for torch's
    /// channels-first, the last for channels-last). Stats per channel.
    pub fn batch_norm(shape: &[usize], axis: usize) -> View {
        let c = shape[axis];
        let a: usize = shape[..axis].iter().product();
        let b: usize = shape[axis + 1..].iter().product();
        View {
            p: 1,
            a,
            g: c,
            b,
            affine_div: b.max(1),
            affine_len: c,
        }
    }

    /// LayerNorm/RMSNorm over the trailing `normalized` elements.
    pub fn layer_norm(shape: &[usize], normalized: usize) -> View {
        let total: usize = shape.iter().product();
        let rows = total.checked_div(normalized).unwrap_or(0);
        View {
            p: rows,
            a: 1,
            g: 1,
            b: normalized,
            affine_div: 1,
            affine_len: normalized,
        }
    }

    /// InstanceNorm on `[N, C, *S]`: stats per (n, c).
    pub fn instance_norm(shape: &[usize]) -> View {
        let s: usize = shape[2..].iter().product();
        View {
            p: shape[0],
            a: 1,
            g: shape[1],
            b: s,
            affine_div: s.max(1),
            affine_len: shape[1],
        }
    }

    /// Channels-last InstanceNorm on `[N, *S, C]` (Keras `groups=-1`).
    pub fn instance_norm_channels_last(shape: &[usize]) -> View {
        let c = shape[shape.len() - 1];
        let s: usize = shape[1..shape.len() - 1].iter().product();
        View {
            p: shape[0],
            a: s,
            g: c,
            b: 1,
            affine_div: 1,
            affine_len: c,
        }
    }

    /// GroupNorm with `groups` on `[N, C, *S]` (channels-first, torch).
    pub fn group_norm(shape: &[usize], groups: usize) -> View {
        let c = shape[1];
        let s: usize = shape[2..].iter().product();
        View {
            p: shape[0],
            a: 1,
            g: groups,
            b: (c / groups) * s,
            affine_div: s.max(1),
            affine_len: c,
        }
    }

    /// GroupNorm with `groups` on `[N, *S, C]` (channels-last, Keras).
    pub fn group_norm_channels_last(shape: &[usize], groups: usize) -> View {
        let c = shape[shape.len() - 1];
        let s: usize = shape[1..shape.len() - 1].iter().product();
        View {
            p: shape[0],
            a: s,
            g: groups,
            b: c / groups,
            affine_div: 1,
            affine_len: c,
        }
    }
}

/// Formats a shape the way torch prints sizes: `[2, 5]`.
pub fn fmt_shape(shape: &[usize]) -> String {
    format!("{shape:?}")
}

/// Checks that `shape` ends with `normalized` (torch's LayerNorm rule).
pub fn check_normalized_shape(shape: &[usize], normalized: &[usize]) -> Result<()> {
    let ok = !normalized.is_empty()
        && shape.len() >= normalized.len()
        && shape[shape.len() - normalized.len()..] == *normalized;
    if ok {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "Given normalized_shape={}, expected input with shape [*, {}], but got input of size{}",
            fmt_shape(normalized),
            normalized
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            fmt_shape(shape)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_norm_2d_groups_channels_and_reduces_batch_and_space() {
        let v = View::batch_norm(&[2, 3, 4, 5], 1);
        assert_eq!((v.p, v.a, v.g, v.b, v.affine_div), (1, 2, 3, 20, 20));
    }

    #[test]
    fn group_norm_affine_index_is_the_channel() {
        let v = View::group_norm(&[2, 6, 5], 3);
        // element (g=1, b=7): channel 2 + 7/5 = 3
        assert_eq!((v.b + 7) / v.affine_div, 3);
    }

    #[test]
    fn normalized_shape_mismatch_reads_like_torch() {
        let e = check_normalized_shape(&[2, 5], &[6]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Given normalized_shape=[6], expected input with shape [*, 6], but got input of size[2, 5]"
        );
    }
}
