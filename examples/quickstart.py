import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import murmur

x, y = load_digits(return_X_y=True)  # 1,797 8x8 images, shipped with scikit-learn
x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
x = (x - x.mean(0)) / (x.std(0) + 1e-6)  # standardized pixels

training = murmur.Training(
    model=lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),
    data=(x[:1500], y[:1500]),  # everyone's data: split among the simulated peers
    eval_data=(x[1500:], y[1500:]),
    loss=F.cross_entropy,
    lr=0.3,
    averaging=murmur.SecureGroups(size=8),
    privacy=murmur.Privacy(epsilon=8, delta=1e-5, clip=1.0, unit="record"),
    rounds=25,
)
result = murmur.simulate(training, peers=50)  # 50 peers on this machine, in virtual time
for record in result.records[::5]:  # row 0 is the initial model
    print(record.round, f"{record.accuracy:.3f}", f"epsilon={record.epsilon:.2f}")
print("plot:", murmur.plot(result, "murmur-plots"))
