// Symmetric tridiagonal eigensolver: implicit QL with Wilkinson-like shifts (the classical tql2
// scheme), in double. The CPU and CUDA Lanczos drivers share it on the host.
#include <cfloat>
#include <cmath>
#include <vector>

#include "topoderiv/lanczos.h"

namespace topoderiv {

bool tridiag_ql(int64_t n, double* d, double* e_in, double* z, double* zrow) {
  if (n <= 0) return true;
  std::vector<double> e(static_cast<size_t>(n), 0.0);  // e[i] couples i and i+1; e[n-1] = 0
  for (int64_t i = 0; i + 1 < n; ++i) e[i] = e_in[i];
  for (int64_t l = 0; l < n; ++l) {
    int iter = 0;
    int64_t mm;
    do {
      for (mm = l; mm < n - 1; ++mm) {
        const double dd = std::fabs(d[mm]) + std::fabs(d[mm + 1]);
        if (std::fabs(e[mm]) <= DBL_EPSILON * dd) break;
      }
      if (mm != l) {
        if (iter++ == 60) return false;
        double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
        double r = std::hypot(g, 1.0);
        g = d[mm] - d[l] + e[l] / (g + std::copysign(r, g));
        double s = 1.0, c = 1.0, p = 0.0;
        int64_t i;
        bool underflow = false;
        for (i = mm - 1; i >= l; --i) {
          double f = s * e[i];
          const double b = c * e[i];
          r = std::hypot(f, g);
          e[i + 1] = r;
          if (r == 0.0) {  // recover from underflow
            d[i + 1] -= p;
            e[mm] = 0.0;
            underflow = true;
            break;
          }
          s = f / r;
          c = g / r;
          g = d[i + 1] - p;
          r = (d[i] - g) * s + 2.0 * c * b;
          p = s * r;
          d[i + 1] = g + p;
          g = c * r - b;
          if (z != nullptr) {
            for (int64_t k = 0; k < n; ++k) {
              f = z[k * n + i + 1];
              z[k * n + i + 1] = s * z[k * n + i] + c * f;
              z[k * n + i] = c * z[k * n + i] - s * f;
            }
          }
          if (zrow != nullptr) {
            f = zrow[i + 1];
            zrow[i + 1] = s * zrow[i] + c * f;
            zrow[i] = c * zrow[i] - s * f;
          }
        }
        if (underflow) continue;
        d[l] -= p;
        e[l] = g;
        e[mm] = 0.0;
      }
    } while (mm != l);
  }
  return true;
}

}  // namespace topoderiv
