# Plain-R references: statistics with apply(), normalization with sweep(), and
# central finite differences.

ref_moments <- function(x, margin) {
  mean <- apply(x, margin, mean)
  variance <- apply(x, margin, function(v) mean((v - mean(v))^2))
  list(mean = mean, variance = variance)
}

ref_normalize <- function(x, margin, mean, variance, gamma = 1, beta = 0, epsilon = 0.001) {
  scale <- gamma / sqrt(variance + epsilon)
  y <- sweep(x, margin, mean)
  y <- sweep(y, margin, array(scale, dim(as.array(mean))), `*`)
  sweep(y, margin, array(beta + 0 * mean, dim(as.array(mean))), `+`)
}

# d/dx of sum(f(x) * dy), one coordinate at a time.
finite_difference <- function(f, x, dy, h = 1e-5) {
  grad <- x
  for (i in seq_along(x)) {
    up <- x
    down <- x
    up[i] <- x[i] + h
    down[i] <- x[i] - h
    grad[i] <- (sum(f(up) * dy) - sum(f(down) * dy)) / (2 * h)
  }
  grad
}

random_array <- function(dims, seed, mean = 0, sd = 1) {
  set.seed(seed)
  array(rnorm(prod(dims), mean, sd), dims)
}
