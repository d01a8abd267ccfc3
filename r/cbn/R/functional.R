# The functional API: one call of the core each, no state. Axes are 1-based as
# in keras3; per-channel results are arrays shaped like the normalized axes.

# Input, axes and channel layout of one call.
prepare_call <- function(x, axis, name = "x") {
  x <- as_input_array(x, name)
  dims <- array_dims(x)
  axes <- resolve_axes(axis, length(dims))
  channel_dims <- dims[sort(axes) + 1L]
  list(x = x, dims = dims, axes = sort(axes), channel_dims = channel_dims,
       channels = prod(channel_dims))
}

channel_array <- function(values, channel_dims) array(values, dim = channel_dims)

#' Per-channel batch statistics
#'
#' Mean and biased (population) variance of `x` per channel, over every axis
#' not in `axis`, optionally counting only the positions a mask selects.
#'
#' @param x A numeric array (or matrix, or vector). Doubles are read in place.
#' @param axis The normalized (channel) axes, 1-based as in keras3: `-1` is the
#'   last axis, `2` the channels of a channels-first input; several axes give
#'   one channel per combination of their indices.
#' @param mask `NULL`, or a logical/numeric array: `x`'s shape (sizes may be 1)
#'   or `x`'s shape without its last axis. Non-zero marks the used positions.
#' @return A list of `mean`, `variance` and `count` (number of used positions),
#'   each an array shaped like the channel axes. A channel with no used
#'   position has mean 0 and variance 0.
#' @examples
#' x <- matrix(c(1, 2, 3, 10, 20, 30), nrow = 3)
#' bn_moments(x)$mean  # 2 20
#' @export
bn_moments <- function(x, axis = -1L, mask = NULL) {
  call <- prepare_call(x, axis)
  res <- .Call(cbn_moments_c, call$x, call$axes, as_mask(mask, call$dims))
  lapply(res, channel_array, call$channel_dims)
}

#' Normalize with given statistics (inference)
#'
#' `y = (x - mean) * gamma / sqrt(variance + epsilon) + beta` per channel.
#'
#' @inheritParams bn_moments
#' @param mean,variance Per-channel statistics (one value per channel, in the
#'   channel axes' R order).
#' @param gamma,beta Per-channel scale and offset; `NULL` means 1 and 0.
#' @param epsilon Added to the variance; a positive number.
#' @return An array shaped like `x`.
#' @examples
#' bn_normalize(matrix(1:6, 3), mean = c(2, 5), variance = c(1, 1), epsilon = 1e-12)
#' @export
bn_normalize <- function(x, mean, variance, gamma = NULL, beta = NULL, axis = -1L,
                         epsilon = 0.001) {
  call <- prepare_call(x, axis)
  c_ <- call$channels
  .Call(cbn_normalize_c, call$x, call$axes, as_channel_values(mean, c_, "mean"),
        as_channel_values(variance, c_, "variance"),
        as_channel_values(gamma, c_, "gamma", optional = TRUE),
        as_channel_values(beta, c_, "beta", optional = TRUE), check_epsilon(epsilon))
}

#' Training forward pass
#'
#' Batch statistics (masked as in [bn_moments()]) and the normalization of every
#' position with them, in one pass of the core.
#'
#' @inheritParams bn_normalize
#' @inheritParams bn_moments
#' @return A list: `y` (shaped like `x`), `mean` and `variance` (the batch
#'   statistics, shaped like the channel axes).
#' @examples
#' bn_train_forward(matrix(c(1, 2, 3, 10, 20, 30), 3), epsilon = 1e-12)$y
#' @export
bn_train_forward <- function(x, gamma = NULL, beta = NULL, axis = -1L, epsilon = 0.001,
                             mask = NULL) {
  call <- prepare_call(x, axis)
  c_ <- call$channels
  res <- .Call(cbn_train_forward_c, call$x, call$axes, as_mask(mask, call$dims),
               as_channel_values(gamma, c_, "gamma", optional = TRUE),
               as_channel_values(beta, c_, "beta", optional = TRUE), check_epsilon(epsilon))
  list(y = res$y, mean = channel_array(res$mean, call$channel_dims),
       variance = channel_array(res$variance, call$channel_dims))
}

#' Backward pass
#'
#' Gradients of the batch normalization `y = (x - mean) / sqrt(variance + epsilon)
#' * gamma + beta` for the output gradient `dy`. With `training = TRUE` the
#' derivative goes through the batch statistics, which must be the (masked)
#' moments of `x` the forward pass used; with `training = FALSE` they are
#' constants.
#'
#' @inheritParams bn_normalize
#' @inheritParams bn_moments
#' @param gamma Per-channel scale of the forward pass; `NULL` means 1.
#' @param dy The output gradient, shaped like `x`.
#' @param training Whether the forward pass used batch statistics.
#' @return A list: `dx` (shaped like `x`), `dgamma` (the sum of `dy * xhat`) and
#'   `dbeta` (the sum of `dy`), per channel.
#' @examples
#' x <- matrix(c(1, 2, 4, 10, 20, 40), 3)
#' fw <- bn_train_forward(x)
#' bn_backward(matrix(1, 3, 2), x, fw$mean, fw$variance)$dbeta  # 3 3
#' @export
bn_backward <- function(dy, x, mean, variance, gamma = NULL, axis = -1L, epsilon = 0.001,
                        mask = NULL, training = TRUE) {
  call <- prepare_call(x, axis)
  dy <- as_input_array(dy, "dy")
  if (!identical(as.integer(array_dims(dy)), as.integer(call$dims))) {
    stop(sprintf("`dy` has shape (%s); expected the shape of `x` (%s)",
                 paste(array_dims(dy), collapse = ", "), paste(call$dims, collapse = ", ")),
         call. = FALSE)
  }
  c_ <- call$channels
  res <- .Call(cbn_backward_c, dy, call$x, call$axes, as_mask(mask, call$dims),
               as_channel_values(mean, c_, "mean"), as_channel_values(variance, c_, "variance"),
               as_channel_values(gamma, c_, "gamma", optional = TRUE), check_epsilon(epsilon),
               check_flag(training, "training"))
  list(dx = res$dx, dgamma = channel_array(res$sum_dy_xhat, call$channel_dims),
       dbeta = channel_array(res$sum_dy, call$channel_dims))
}

check_epsilon <- function(epsilon) {
  if (!is.numeric(epsilon) || length(epsilon) != 1L || is.na(epsilon) || epsilon <= 0) {
    stop(sprintf("`epsilon` must be one positive number; received %s", deparse1(epsilon)),
         call. = FALSE)
  }
  as.double(epsilon)
}
